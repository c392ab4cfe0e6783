"""The data stage's packing: several processes give the same bytes; a killed run resumes."""

from __future__ import annotations

import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from project_paths import REPO_ROOT, TEST_PARAMS

from openrelease.data.stage import build_data
from openrelease.digest import hash_folder
from openrelease.manifest import DataManifest
from openrelease.params import load_params

KILL_AFTER_SHARDS = """\
import os, signal, sys
from pathlib import Path

from openrelease.data import pack
from openrelease.data.stage import build_data
from openrelease.params import load_params

finish, written = pack._finish_shard, []


def finish_then_die(rows, work_dir, progress):
    finish(rows, work_dir, progress)
    written.append(1)
    if len(written) == 4:  # the progress file records 3 shards; the 4th is on disk, unrecorded
        os.kill(os.getpid(), signal.SIGKILL)


pack._finish_shard = finish_then_die
params = load_params(Path(sys.argv[1]) / "params.yaml")
build_data(params.data, seed=params.seed, project_dir=Path(sys.argv[1]))
"""


def _project(root: Path, **data: object) -> Path:
    root.mkdir(parents=True)
    raw = yaml.safe_load(TEST_PARAMS.read_text())
    raw["data"].update({"seqs_per_shard": 16, **data})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def _build(project: Path) -> DataManifest:
    params = load_params(project / "params.yaml")
    return build_data(params.data, seed=params.seed, project_dir=project)


def test_processes_and_a_killed_run_give_the_same_bytes(tmp_path: Path) -> None:
    one = _build(_project(tmp_path / "one"))
    assert len(one.shards) >= 6
    two = _build(_project(tmp_path / "two", num_proc=2))
    assert two == one  # every digest, hence the data digest, is the same
    assert hash_folder(tmp_path / "two/artifacts/data") == hash_folder(
        tmp_path / "one/artifacts/data"
    )

    killed = _project(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_SHARDS, str(killed)], env=env, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    work = killed / "artifacts" / ".data.partial"
    assert not (killed / "artifacts/data").exists()
    kept = {p.name: p.stat().st_ino for p in (work / "pretrain").glob("shard-*.npy")}
    assert len(kept) == 4
    resumed = _build(killed)
    assert resumed == one
    assert not work.exists()
    final = killed / "artifacts/data/pretrain"
    # The 3 recorded shards were kept (same inode, moved into place), not rewritten.
    for name in ("shard-00000.npy", "shard-00001.npy", "shard-00002.npy"):
        assert (final / name).stat().st_ino == kept[name]
    assert (final / "shard-00003.npy").stat().st_ino != kept["shard-00003.npy"]


def test_worker_processes_leave_the_callers_environment_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The workers run single-threaded; the caller's own tokenizers keep their threads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from openrelease.data.encoding import encode_documents

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    tokenizer = Tokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    chunks = [[{"text": "a b a"}], [{"text": "b c"}]]
    encoded = list(encode_documents(tokenizer, chunks, operator.itemgetter("text"), num_proc=2))
    assert [ids.tolist() for _, (ids, _) in encoded] == [[0, 1, 0], [1, 2]]
    assert [n.tolist() for _, (_, n) in encoded] == [[3], [2]]
    assert "TOKENIZERS_PARALLELISM" not in os.environ
