"""Subcommands of the ``lightning-amor`` CLI that are not Trainer methods (each module has ``main(argv)``)."""
