"""OUTPUT/README.md: the dataset card that tells Hugging Face `datasets` the output's tables.

Its YAML front matter lists one config per table, so `load_dataset(OUTPUT, "images")`
loads images/ alone (the tables have different columns: loading the directory as one
Parquet dataset fails). Written when a run starts, so an output that is still being
written opens too; each run rewrites it.
"""

from __future__ import annotations

import yaml

from pipeline.storage import filesystem, join, redact, write_atomic

CARD_FILE = "README.md"
TABLES = ("images", "embeddings", "texts", "errors")  # retries/ is a run's to-do list, not data


def card_text(family: str, model: str) -> str:
    front = {"configs": [{"config_name": t, "data_files": f"{t}/*.parquet", **({"default": True} if t == "images" else {})}
                         for t in TABLES],
             "tags": ["genfleet", "image-generation"]}
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
            f"# genfleet output\n\nMade by genfleet with the `{family}` family, model `{redact(model)}`.\n\n"
            "One config per table: `datasets.load_dataset(OUTPUT, \"images\")` (the `image` column decodes to PIL images),\n"
            "`\"embeddings\"`, `\"texts\"` (answers and plans), `\"errors\"` (rows that could not be made).\n"
            "`_summary.json` holds the run's counts and provenance; `report.html` an overview.\n")


def write_card(output: str, family: str, model: str) -> None:
    fs, root = filesystem(output)
    write_atomic(fs, join(root, CARD_FILE), card_text(family, model).encode())
