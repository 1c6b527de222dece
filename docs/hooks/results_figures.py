"""MkDocs hook: the figures under ``benchmarks/results/`` join the site at that same path.

The measurements' figures live beside the JSON and tables they come from; copying them into
``docs/`` would keep two versions of each. A page links one as
``benchmarks/results/<name>.png`` (a path from the site's root, the folder the repository holds
it in).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

RESULTS = Path("benchmarks") / "results"
FIGURE_SUFFIXES = (".png", ".svg")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add every figure of ``benchmarks/results/`` to the site's files, under the same path."""
    root = Path(config.config_file_path).parent
    for figure in sorted((root / RESULTS).iterdir()):
        if figure.suffix in FIGURE_SUFFIXES:
            files.append(File(
                (RESULTS / figure.name).as_posix(), src_dir=str(root), dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            ))
    return files
