"""Answer "exactly what produced this checkpoint?" from the record.json files of a workspace.

The chain runs: sources -> data manifest -> each stage (params digest, seed, commit, run id) ->
its checkpoints, linked by parent digests, up to the checkpoint asked about. A stage started
from an existing model (a stage's ``from``) is preceded by a base-model node (repo, commit).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from openrelease.errors import ProvenanceError
from openrelease.layout import (
    CHECKPOINT_META,
    EVAL_STAGE,
    RECORD,
    Workspace,
    stage_rel,
    step_name,
)
from openrelease.manifest import CheckpointMeta, DataManifest, StageRecord, read_model

DATA_STAGE = "data"
INIT_SUFFIX = "-final"
"""A training record's input ``<stage>-final``: the checkpoint it started from."""


class LineageNode(BaseModel):
    """One link of the chain."""

    model_config = ConfigDict(frozen=True)
    kind: str
    """source, data, base-model, stage or checkpoint."""
    name: str
    digest: str
    details: dict[str, str]
    parent: str | None
    """Digest of the node this one was made from."""


class LineageReport(BaseModel):
    """The chain from sources to the target, oldest first."""

    model_config = ConfigDict(frozen=True)
    target: str
    nodes: tuple[LineageNode, ...]


def _records(project_dir: Path) -> dict[str, StageRecord]:
    """The training stages' records: ``artifacts/<stage>/record.json`` with checkpoints."""
    out: dict[str, StageRecord] = {}
    for path in sorted(Workspace(project_dir).artifacts.glob(f"*/{RECORD}")):
        if path.parent.name in (DATA_STAGE, EVAL_STAGE):
            continue
        out[path.parent.name] = read_model(path, StageRecord)
    return out


def _parent_stage(record: StageRecord) -> str | None:
    """The stage whose final checkpoint the recorded run started from (its ``<stage>-final``)."""
    for item in record.inputs:
        if item.kind == "checkpoint" and item.name.endswith(INIT_SUFFIX):
            return item.name.removesuffix(INIT_SUFFIX)
    return None


def _chain(records: dict[str, StageRecord], stage: str, target: str) -> list[str]:
    """The stages from the first one (scratch or a base model) to ``stage``."""
    chain = [stage]
    while True:
        record = records.get(chain[0])
        if record is None:
            raise ProvenanceError(
                f"{stage_rel(chain[0])}/{RECORD} is missing; the chain to {target} "
                f"is broken. Re-run `dvc repro {chain[0]}` (or `dvc pull`)."
            )
        parent = _parent_stage(record)
        if parent is None or parent in chain:
            return chain
        chain.insert(0, parent)


def _data_nodes(project_dir: Path) -> list[LineageNode]:
    path = Workspace(project_dir).stage_manifest("data")
    if not path.exists():
        return []
    m = read_model(path, DataManifest)
    nodes = [
        LineageNode(
            kind="source",
            name=s.name,
            digest=s.sha256,
            parent=None,
            details={"kind": s.kind, "path": s.path or "", "records": str(s.num_records)},
        )
        for s in m.sources
    ]
    nodes.append(
        LineageNode(
            kind="data",
            name="data manifest",
            digest=m.data_digest,
            parent=None,
            details={
                "tokenizer": m.tokenizer_sha256,
                "seed": str(m.seed),
                "sources": ", ".join(s.sha256[:19] for s in m.sources),
            },
        )
    )
    return nodes


def _stage_node(record: StageRecord, parent: str | None) -> LineageNode:
    return LineageNode(
        kind="stage",
        name=record.stage,
        digest=record.params_digest,
        parent=parent,
        details={
            "seed": str(record.seed),
            "commit": record.git.commit or "unknown",
            "dirty": str(record.git.dirty),
            "run_id": record.run_id or "not synced",
            "parent_run_id": record.parent_run_id or "not synced",
            "inputs": ", ".join(f"{i.name}={i.digest[:19]}" for i in record.inputs),
        },
    )


def _checkpoint_node(meta: CheckpointMeta) -> LineageNode:
    return LineageNode(
        kind="checkpoint",
        name=f"{meta.stage}/{step_name(meta.step)}",
        digest=meta.checkpoint_digest,
        parent=meta.parent_digest,
        details={
            "tokens_seen": str(meta.tokens_seen),
            "data_digest": meta.data_digest,
            "samples": f"{meta.sample_range[0]}..{meta.sample_range[1]}",
            "loss": "" if meta.loss is None else f"{meta.loss:.4f}",
        },
    )


def _base_model_node(record: StageRecord, first: CheckpointMeta | None) -> LineageNode | None:
    """The existing model the stage itself started from (its ``from``), if it did."""
    base = next((i for i in record.inputs if i.kind == "base-model"), None)
    if base is None or first is None or first.parent_digest != base.digest:
        return None  # no base model, or one an earlier stage started from
    return LineageNode(
        kind="base-model",
        name=base.path,
        digest=base.digest,
        parent=None,
        details={
            "source": base.path,
            "base_model": (first.base_model.repo if first.base_model else base.path),
            "commit": (first.base_model.commit or "local") if first.base_model else "",
            "files": str(len(first.base_model.files)) if first.base_model else "",
        },
    )


def _find_target(records: dict[str, StageRecord], target: str) -> tuple[str, int | None]:
    """Resolve ``target`` (checkpoint folder, stage name, or run id) to (stage, step or None)."""
    meta_path = Path(target) / CHECKPOINT_META
    if meta_path.exists():
        meta = read_model(meta_path, CheckpointMeta)
        return meta.stage, meta.step
    if target in records:
        return target, None
    for stage, record in records.items():
        if target in (record.run_id, record.run_key):
            return stage, None
    raise ProvenanceError(
        f"{target!r} is not a checkpoint folder, a stage name or a recorded run "
        "id; pass e.g. artifacts/sft/checkpoints/step-30 or `sft`."
    )


def lineage(project_dir: Path, target: str) -> LineageReport:
    """Build the chain that produced ``target``; raise if a link is missing or contradicts."""
    records = _records(project_dir)
    stage, step = _find_target(records, target)
    nodes = _data_nodes(project_dir)
    parent: str | None = nodes[-1].digest if nodes else None
    for name in _chain(records, stage, target):
        record = records[name]
        checkpoints = sorted(record.checkpoints, key=lambda c: c.step)
        base = _base_model_node(record, checkpoints[0] if checkpoints else None)
        if base is not None:
            nodes.append(base)
        nodes.append(_stage_node(record, parent))
        if name == stage and step is not None:
            checkpoints = [c for c in checkpoints if c.step <= step]
            if not checkpoints or checkpoints[-1].step != step:
                raise ProvenanceError(f"{target}: step {step} is not in {name}'s record.json.")
        previous = checkpoints[0].parent_digest if checkpoints else None
        for meta in checkpoints:
            if meta.parent_digest != previous:
                raise ProvenanceError(
                    f"{name}/{step_name(meta.step)}: parent digest {meta.parent_digest} does not "
                    f"match the previous checkpoint {previous}; the record was altered or mixed up."
                )
            nodes.append(_checkpoint_node(meta))
            previous = meta.checkpoint_digest
        parent = previous
    return LineageReport(target=target, nodes=tuple(nodes))


def dot_string(text: str) -> str:
    """``text`` as a quoted DOT string: quotes, backslashes and control characters escaped.

    Record strings come from files anyone can edit; unescaped, a quote would end the string and
    let the rest of the text add nodes, attributes (e.g. a ``URL`` or ``image``) or graphs.
    """
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def to_dot(report: LineageReport) -> str:
    """Render the chain as Graphviz DOT; every string from a record is escaped (`dot_string`)."""
    lines = ["digraph lineage {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    for node in report.nodes:
        label = dot_string(f"{node.kind}: {node.name}\n{node.digest[:19]}")
        lines.append(f"  {dot_string(node.digest)} [label={label}];")
        if node.parent:
            lines.append(f"  {dot_string(node.parent)} -> {dot_string(node.digest)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
