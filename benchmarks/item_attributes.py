"""Item attribute tables for the benchmark datasets, for ``data.item_features`` (the model's ``model.item_features``).

    python -m benchmarks.item_attributes [--dataset ml-1m] [--data-root ../shared/data] [--out FILE]

ML-1M: ``ml-1m.txt`` numbers its items 1..3416 (the SASRec preprocessing); ``sas_to_original_items.txt`` maps
them back to GroupLens MovieIDs, whose ``movies.dat`` line (``MovieID::Title::Genres``, Latin-1) gives the genres
(``Animation|Children's|Comedy``) and, from the title's ``(1995)``, the decade. Written as a CSV with columns
``item_id`` (the ml-1m.txt id), ``genres`` (``|``-separated) and ``decade`` (``1990s``), read by
``conf/benchmarks/ml-1m-attributes.yaml``. The shared data are never copied into the repository: the file goes
under ``work/`` (ignored by git), made from ``--data-root`` on the machine that runs the benchmark.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = {"ml-1m": ROOT / "work" / "bench" / "ml-1m-items.csv"}


def ml_1m_items(data_root: Path) -> pl.DataFrame:
    """(item_id Int64, genres String, decade String) for every item of ml-1m.txt; raises ValueError naming the
    file when an item has no movies.dat line or a title has no year."""
    folder = data_root / "ml-1m"
    mapping = pl.read_csv(folder / "sas_to_original_items.txt", separator=" ", has_header=False,
                          new_columns=["item_id", "movie_id"], schema_overrides={"item_id": pl.Int64,
                                                                                  "movie_id": pl.Int64})
    lines = (folder / "movies.dat").read_bytes().decode("latin-1").splitlines()
    movies = pl.DataFrame([line.split("::") for line in lines if line.strip()], orient="row",
                          schema=["movie_id", "title", "genres"])
    movies = movies.with_columns(
        pl.col("movie_id").cast(pl.Int64),
        (pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int64) // 10 * 10).cast(pl.String).add("s")
        .alias("decade"),
    )
    items = mapping.join(movies, on="movie_id", how="left", maintain_order="left")
    if missing := items.filter(pl.col("genres").is_null() | pl.col("decade").is_null()).height:
        raise ValueError(f"{folder}: {missing} ml-1m.txt item(s) without a movies.dat line or a year in the title")
    return items.select("item_id", "genres", "decade")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DEFAULT_OUT), default="ml-1m")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or DEFAULT_OUT[args.dataset]
    items = ml_1m_items(args.data_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    items.write_csv(out)
    print(f"{out}: {items.height} items, {items['genres'].str.split('|').explode().n_unique()} genres, "
          f"{items['decade'].n_unique()} decades")


if __name__ == "__main__":
    main()
