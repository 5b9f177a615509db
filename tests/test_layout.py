"""The repo's packages, not unrelated PyPI distributions named `adapters` / `trainer`, are imported."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packages_resolve_inside_the_repo():
    import adapters
    import jobs
    import server
    import trainer

    for package in (adapters, jobs, server, trainer):
        assert Path(package.__file__).resolve().is_relative_to(ROOT), package.__file__


def test_cli_lists_subcommands(capsys):
    from loraswap.cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("base", "serve", "train", "merge", "trainer-service"):
        assert name in out
