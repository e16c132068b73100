"""A run directory's files: ``run.json`` (stage, config, data), ``metrics.jsonl`` (one record per log step), written
whole or appended.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict

from mkt_torchrec.config import Config, config_from_dict

log = logging.getLogger("mkt.train")


def write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def read_run(run_dir: str) -> Dict[str, Any]:
    """RUN/run.json (stage, config, data, ...).

    Raises:
        FileNotFoundError / ValueError: not a run directory, or a run.json that is not a JSON object (naming it).
    """
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: not a run directory (run.json is missing)")
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(run, dict) or "stage" not in run or "config" not in run:
        raise ValueError(f"{path}: not a run record (needs 'stage' and 'config')")
    return run


def run_config(run_dir: str) -> Config:
    """The config a run was trained with (from RUN/run.json)."""
    return config_from_dict(read_run(run_dir)["config"])


def log_record(run_dir: str, record: Dict[str, Any]) -> None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(run_dir: str, step: int, is_main: bool) -> None:
    """On resume, drop the metrics records of steps after the checkpoint (they are trained again)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not is_main or not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
