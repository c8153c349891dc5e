"""Tests of lightning-amor (a package, so that test modules can share ``tests.objectives``)."""
