"""benchmarks/results.py: a benchmark rewrites its own section of RESULTS.md and leaves the others alone."""

from __future__ import annotations

from benchmarks.results import write_section


def test_a_section_is_replaced_in_place_and_a_new_one_appended(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Sphere\nold sphere table\n\n## VAE\nvae table\n")
    write_section(path, "## Sphere", "## Sphere\nnew sphere table\n")
    assert path.read_text() == "# Benchmark results\n\n## Sphere\nnew sphere table\n\n## VAE\nvae table\n"
    write_section(path, "## Inference", "## Inference\ntimings\n")
    assert path.read_text().endswith("## VAE\nvae table\n\n## Inference\ntimings\n")
    assert path.read_text().count("## Sphere") == 1


def test_a_missing_file_is_created_with_a_title(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section(path, "## Sphere", "## Sphere\ntable\n")
    assert path.read_text() == "# Benchmark results\n\n## Sphere\ntable\n"
