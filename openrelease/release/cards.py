"""Documents generated from the record: model card, technical report, research paper.

Every number comes from record.json, the manifests and the eval results; nothing is typed in.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult as HfEvalResult
from huggingface_hub import ModelCard, ModelCardData

from openrelease.audit.mof import COMPONENTS
from openrelease.errors import ArtifactError, ParamsError
from openrelease.layout import (
    BundleSection,
    RECORD,
    STAGE_MANIFEST,
    Workspace,
    hub_branch,
    stage_rel,
)
from openrelease.manifest import (
    BASE_MODEL_RELATION,
    DataManifest,
    EvalResult,
    PinnedSource,
    ReproCertificate,
    StageManifest,
    StageRecord,
    read_model,
)
from openrelease.params import PipelineParams
from openrelease.release.model_index import harness_eval_results

HF_LICENSES = {
    "Apache-2.0": "apache-2.0",
    "MIT": "mit",
    "BSD-3-Clause": "bsd-3-clause",
    "BSD-2-Clause": "bsd-2-clause",
    "CC-BY-4.0": "cc-by-4.0",
    "CC-BY-SA-4.0": "cc-by-sa-4.0",
    "CC0-1.0": "cc0-1.0",
    "CDLA-Permissive-2.0": "cdla-permissive-2.0",
    "CDLA-Permissive-1.0": "cdla-permissive-1.0",
    "CDLA-Sharing-1.0": "cdla-sharing-1.0",
    "ODC-By-1.0": "odc-by",
    "ODbL-1.0": "odbl",
    "PDDL-1.0": "pddl",
    "MPL-2.0": "mpl-2.0",
    "GPL-3.0-only": "gpl-3.0",
    "LGPL-3.0-only": "lgpl-3.0",
    "AGPL-3.0-only": "agpl-3.0",
}


@dataclass(frozen=True)
class ReleaseRecord:
    """Everything the documents are generated from."""

    params: PipelineParams
    data: DataManifest
    stages: dict[str, StageManifest]
    records: dict[str, StageRecord]
    results: list[EvalResult]
    version: str
    created: str
    certificate: ReproCertificate | None = None
    """The replays of `openrelease bundle --certify`, when the bundle carries them."""

    @property
    def repo_id(self) -> str:
        """``organization/name``: the Hub repo the documents name (publish retargets them)."""
        return f"{self.params.release.organization}/{self.params.release.name}"

    @property
    def final_stage(self) -> str:
        """The last stage that ran: its final checkpoint is the released model."""
        return list(self.stages)[-1]

    def stage_chain(self) -> str:
        """The stages that ran, e.g. ``pretrain -> sft``."""
        return " -> ".join(self.stages)

    def final_results(self) -> dict[str, EvalResult]:
        """The eval result of each stage's final checkpoint, in pipeline order."""
        order: dict[str, int] = {stage: i for i, stage in enumerate(self.params.train_stages)}
        out: dict[str, EvalResult] = {}
        for r in sorted(self.results, key=lambda r: (order.get(r.stage, len(order)), r.step)):
            out[r.stage] = r
        return out

    def base_model(self) -> PinnedSource | None:
        """The existing model the released chain started from (a stage's ``from``), if any."""
        final = self.stages[self.final_stage].checkpoints[-1]
        return final.base_model

    def num_params(self) -> int:
        """Parameter count from the model params (embeddings included)."""
        m = self.params.model
        head_dim = m.hidden_size // m.num_heads
        attn = m.hidden_size * head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
        mlp = 3 * m.hidden_size * m.intermediate_size
        layers = m.num_layers * (attn + mlp + 2 * m.hidden_size)
        embed = self.data.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
        return layers + embed + m.hidden_size


def _read_stages(project_dir: Path, stages: tuple[str, ...]) -> dict[str, StageManifest]:
    """The stage manifests that exist, which must be a prefix of the pipeline's stages."""
    found: dict[str, StageManifest] = {
        stage: read_model(path, StageManifest)
        for stage in stages
        if (path := Workspace(project_dir).stage_manifest(stage)).is_file()
    }
    expected = list(stages[: max(len(found), 1)])
    for stage in expected:
        if stage not in found:
            later = " but later stages ran" if found else ""
            raise ArtifactError(
                f"{stage_rel(stage)}/{STAGE_MANIFEST} is missing{later}; run `dvc repro {stage}`."
            )
    return found


def _read_results(project_dir: Path, stages: dict[str, StageManifest]) -> list[EvalResult]:
    """The eval result of every checkpoint, each checked against the checkpoint it names."""
    base = Workspace(project_dir).eval_results
    if not base.is_dir() or not any(base.rglob("*.json")):
        rel = base.relative_to(project_dir).as_posix()
        raise ArtifactError(f"no eval results in {rel}; run `dvc repro eval`.")
    results = []
    for stage, manifest in stages.items():
        for meta in manifest.checkpoints:
            path = Workspace(project_dir).eval_result(stage, meta.step)
            rel = path.relative_to(project_dir).as_posix()
            if not path.is_file():
                raise ArtifactError(f"{rel} is missing; run `dvc repro eval`.", path=rel)
            result = read_model(project_dir / rel, EvalResult)
            if result.checkpoint_digest != meta.checkpoint_digest:
                raise ArtifactError(
                    f"{rel} evaluates checkpoint {result.checkpoint_digest[:19]}, not the "
                    f"current {meta.checkpoint_digest[:19]}; run `dvc repro eval`.",
                    path=rel,
                )
            results.append(result)
    return results


def _read_records(project_dir: Path, data_dir: Path, stages: list[str]) -> dict[str, StageRecord]:
    """record.json of the data stage and of each released stage, where they exist."""
    paths = {"data": data_dir / RECORD}
    paths |= {s: Workspace(project_dir).record(s) for s in stages}
    return {k: read_model(p, StageRecord) for k, p in paths.items() if p.is_file()}


def _created(
    project_dir: Path, stages: dict[str, StageManifest], records: dict[str, StageRecord]
) -> str:
    """When the record was finished: the last stage's finish time (its manifest's, unrecorded)."""
    times = [r.finished or r.started for r in records.values()]
    for stage in stages:
        if stage not in records:
            mtime = (Workspace(project_dir).stage_manifest(stage)).stat().st_mtime
            times.append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)))
    return max(times)


def read_release_record(project_dir: Path, params: PipelineParams) -> ReleaseRecord:
    """Read and cross-check everything a release is made from.

    Raises:
        ArtifactError: A stage's output, the data manifest or an eval result is missing or
            stale; the message names the `dvc repro` stage that makes it.
    """
    data_dir = project_dir / params.data.out_dir
    if not (data_dir / STAGE_MANIFEST).is_file():
        raise ArtifactError(
            f"{params.data.out_dir}/{STAGE_MANIFEST} is missing; run `dvc repro data`.",
            path=f"{params.data.out_dir}/{STAGE_MANIFEST}",
        )
    data = read_model(data_dir / STAGE_MANIFEST, DataManifest)
    stages = _read_stages(project_dir, params.train_stages)
    records = _read_records(project_dir, data_dir, list(stages))
    rec = ReleaseRecord(
        params=params,
        data=data,
        stages=stages,
        records=records,
        results=_read_results(project_dir, stages),
        version="",
        created=_created(project_dir, stages, records),
    )
    return dataclasses.replace(rec, version=release_version(rec.num_params()))


def component_licenses(params: PipelineParams) -> dict[str, str]:
    """SPDX license per MOT component from the ``release.licenses`` section."""
    lic = params.release.licenses
    by_type = {"code": lic.code, "data": lic.data, "document": lic.documentation}
    out = {name: by_type[kind] for name, (kind, _) in COMPONENTS.items()}
    for name in ("Model parameters (Final)", "Model parameters (Intermediate)", "Model metadata"):
        out[name] = lic.weights
    return out


_STAGE_PHRASES = {
    "pretrain": "pretraining",
    "sft": "supervised instruction tuning",
    "dpo": "direct preference optimisation",
    "distill": "chain-of-thought distillation",
    "grpo": "GRPO reinforcement learning with verifiable rewards",
}


def _stage_phrases(stages: list[str]) -> str:
    phrases = [_STAGE_PHRASES.get(s, s) for s in stages]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def release_version(num_params: int) -> str:
    """A MOT-style size label: ``124M``, ``6.7B``, ``33K``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num_params >= scale:
            return f"{num_params / scale:.3g}{unit}"
    return str(num_params)


def _hf_license(spdx: str) -> dict[str, str]:
    if spdx in HF_LICENSES:
        return {"license": HF_LICENSES[spdx]}
    return {
        "license": "other",
        "license_name": spdx.lower(),
        "license_link": f"LICENSES/{spdx}.txt",
    }


def checkpoint_branches(rec: ReleaseRecord) -> dict[tuple[str, int], str]:
    """The Hub branch of every checkpoint, from the ``release.branch_name`` template.

    Raises:
        ParamsError: Two checkpoints get one name (e.g. ``{tokens}`` rounds two counts alike).
    """
    template = rec.params.release.branch_name
    names: dict[tuple[str, int], str] = {}
    for stage, manifest in rec.stages.items():
        for c in manifest.checkpoints:
            names[(stage, c.step)] = hub_branch(
                template, stage=stage, step=c.step, tokens=c.tokens_seen
            )
    if len(set(names.values())) < len(names):
        raise ParamsError(
            f"release.branch_name {template!r} gives two checkpoints the same branch name; "
            "use {tokens_exact} instead of {tokens}, or keep {step} distinct."
        )
    return names


def use_snippet(repo_id: str) -> str:
    """The card's "Use" code: chat with the model (transformers 5: a BatchEncoding, unpacked)."""
    return "\n".join(
        [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tok = AutoTokenizer.from_pretrained("{repo_id}")',
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            'msgs = [{"role": "user", "content": "What is 12 + 30?"}]',
            "inputs = tok.apply_chat_template(",
            '    msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ")",
            "out = model.generate(**inputs, max_new_tokens=48, do_sample=False)",
            'print(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
        ]
    )


def card_eval_results(rec: ReleaseRecord) -> list[HfEvalResult]:
    """model-index entries: every metric and lm-eval score of the released (final) checkpoint."""
    repo_id = rec.repo_id
    last = rec.final_results().get(rec.final_stage)
    if last is None:
        return []
    return [
        HfEvalResult(
            task_type="text-generation",
            task_name="Text generation",
            dataset_type=f"{repo_id}-data",
            dataset_name=f"{rec.params.release.name} held-out eval",
            metric_type=k,
            metric_name=k.replace("_", " "),
            metric_value=round(v, 6),
        )
        for k, v in sorted(last.metrics.items())
    ] + harness_eval_results(last)  # lm-eval scores


def _checkpoint_table(rec: ReleaseRecord) -> list[str]:
    branches = checkpoint_branches(rec)
    results = {(r.stage, r.step): r for r in rec.results}
    rows = [
        "| branch | stage | step | tokens | loss | eval |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, manifest in rec.stages.items():
        for c in manifest.checkpoints:
            loss = f"{c.loss:.4f}" if c.loss is not None else "-"
            r = results.get((stage, c.step))
            evals = ", ".join(f"{k} {v:.4g}" for k, v in sorted(r.metrics.items())) if r else "-"
            rows.append(
                f"| `{branches[(stage, c.step)]}` | {stage} | {c.step} | {c.tokens_seen:,} | "
                f"{loss} | {evals} |"
            )
    return rows


def model_card(rec: ReleaseRecord) -> str:
    """README.md: a `huggingface_hub.ModelCard` (license, datasets, tags, model-index)."""
    name, repo_id = rec.params.release.name, rec.repo_id
    first = next(iter(rec.stages.values())).checkpoints[0]
    first_branch = checkpoint_branches(rec)[(first.stage, first.step)]
    license_fields = _hf_license(rec.params.release.licenses.weights)
    base = rec.base_model()
    from_hub = base is not None and base.kind == "hf"
    data = ModelCardData(
        license=license_fields["license"],
        license_name=license_fields.get("license_name"),
        license_link=license_fields.get("license_link"),
        base_model=base.repo if base is not None and from_hub else None,
        base_model_relation=BASE_MODEL_RELATION if from_hub else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        datasets=[f"{repo_id}-data"],
        language=["en"],
        tags=["openrelease", "fully-open", "mof", *rec.stages],
        model_name=name,
        eval_results=card_eval_results(rec) or None,
    )
    lines = [
        f"# {name}",
        "",
        (
            f"A fully-open {rec.num_params() / 1e6:.2f}M-parameter {rec.params.model.arch} causal "
            f"language model trained from scratch by openrelease in {len(rec.stages)} stage(s) "
            if base is None
            else f"A causal language model fine-tuned by openrelease from {_base_phrase(base)} "
            f"in {len(rec.stages)} stage(s) "
        )
        + f"({rec.stage_chain()}). Weights, every intermediate checkpoint, "
        f"data ([{repo_id}-data](https://huggingface.co/datasets/{repo_id}-data)), data order, "
        "code, configs, logs and evaluations are in this release.",
        "",
        *_base_model_section(base, included=rec.params.release.include_base_model),
        "## Use",
        "",
        "```python",
        use_snippet(repo_id),
        "```",
        "",
        f"Intermediate checkpoints are branches (`{rec.params.release.branch_name}`, tokens "
        "seen rounded to 3 digits): "
        f'`AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{first_branch}")`.',
        "",
        "## Training stages",
        "",
        "| stage | initialised from | steps | tokens seen | final loss | checkpoints |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    previous = "random init (seed)"
    for stage, manifest in rec.stages.items():
        c = manifest.checkpoints[-1]
        started = manifest.checkpoints[0]
        if started.base_model is not None and started.parent_digest == started.base_model.digest:
            previous = _base_phrase(started.base_model)
        loss = f"{c.loss:.4f}" if c.loss is not None else "-"
        lines.append(
            f"| {stage} | {previous} | {c.step} | {c.tokens_seen:,} | {loss} | "
            f"{len(manifest.checkpoints)} |"
        )
        previous = f"{stage} step {c.step}"
    lines += [
        "",
        "## Checkpoints",
        "",
        "Every checkpoint, in training order (the Hub lists branches alphabetically):",
        "",
        *_checkpoint_table(rec),
        "",
        "## Evaluation",
        "",
        _results_table(rec.final_results()),
        "",
        *_certificate_section(rec.certificate),
        "## Intended use and limitations",
        "",
        "A research artefact for studying training dynamics and reproducibility; it is far "
        "too small for real tasks and its synthetic corpus covers only simple stories and "
        "arithmetic. Do not use it for decisions about people.",
        "",
        "## Openness",
        "",
        "See `mof.yaml` (Model Openness Framework 1.0 description) and "
        "run `openrelease audit` on this folder or repo to score it from evidence; "
        "`openrelease verify` checks every file against `MANIFEST.json`.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _base_phrase(base: PinnedSource) -> str:
    return f"`{base.repo}` at `{base.commit}`" if base.kind == "hf" else f"`{base.repo}`"


def _base_model_section(base: PinnedSource | None, *, included: bool) -> list[str]:
    """The base model by reference (repo, commit, the sha256 of every file used), and whether
    its files are in the bundle (``release.include_base_model``)."""
    if base is None:
        return []
    rows = [f"| `{f.path}` | {f.size:,} | `{f.sha256}` |" for f in base.files]
    where = (
        f"Its files are part of this release, in `{BundleSection.BASE_MODEL}/`"
        if included
        else "Its weights are not part of this release"
    )
    return [
        "## Base model",
        "",
        f"Started from {_base_phrase(base)} (license: {base.license or 'not stated'}; "
        f"relation: {BASE_MODEL_RELATION}). {where}; these are the files used, each checked "
        "against the Hub's sha256 before training:",
        "",
        "| file | bytes | sha256 |",
        "| --- | --- | --- |",
        *rows,
        "",
    ]


def certificate_lines(certificate: ReproCertificate) -> list[str]:
    """One line per replay: ``pretrain steps 4..8 replayed: identical sha256 (sha256:ab12...)``."""
    lines = []
    for r in certificate.replays:
        where = f"{r.replay_world_size} process(es) on {r.replay_device}"
        if r.identical:
            outcome = f"identical sha256 (`{r.weights_sha256[:23]}...`)"
        else:
            delta = "not comparable" if r.max_abs_delta is None else f"{r.max_abs_delta:.3g}"
            loss = "" if r.max_loss_delta is None else f", max loss delta {r.max_loss_delta:.3g}"
            outcome = f"drift: max |delta| {delta}{loss}"
        lines.append(f"{r.stage} steps {r.from_step}..{r.to_step} replayed: {outcome}, {where}")
    return lines


def _certificate_section(certificate: ReproCertificate | None) -> list[str]:
    if certificate is None or not certificate.replays:
        return []
    first = certificate.replays[0]
    return [
        "## Reproducibility",
        "",
        "Reproducibility certificate (`certificate.json`, made when this release was bundled): "
        "each replay restored a recorded training state from `states/` and retrained to the "
        "next checkpoint with the recorded params, data order and seeds.",
        "",
        *(f"- {line}" for line in certificate_lines(certificate)),
        "",
        f"Guarantee: {certificate.guarantee}. The states these replays start from are in "
        "`states/`; rerun one with `openrelease reproduce . --stage "
        f"{first.stage} --from-step {first.from_step} --to-step {first.to_step}`.",
        "",
    ]


def _results_table(final: dict[str, EvalResult]) -> str:
    keys = sorted({k for r in final.values() for k in r.metrics})
    if not keys:
        return "No evaluation results."
    rows = [
        "| stage | step | " + " | ".join(keys) + " |",
        "| --- | --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for stage, r in final.items():
        vals = " | ".join(f"{r.metrics[k]:.4g}" if k in r.metrics else "-" for k in keys)
        rows.append(f"| {stage} | {r.step} | {vals} |")
    return "\n".join(rows)


def technical_report(rec: ReleaseRecord) -> str:
    """How the model was made, from the record: architecture, data, each stage, compute, results."""
    p, d = rec.params, rec.data
    lines = [
        f"# Technical report: {p.release.name}",
        "",
        f"Generated by openrelease from the run record on {rec.created}.",
        "",
        "## Architecture",
        "",
        "```yaml",
        yaml.safe_dump(p.model.model_dump(mode="json"), sort_keys=False).rstrip(),
        "```",
        "",
        f"Parameters: {rec.num_params():,}. Vocabulary: {d.vocab_size} (byte-level BPE, "
        f"tokenizer digest {d.tokenizer_sha256}).",
        "",
        "## Data",
        "",
        f"{d.num_pretrain_tokens:,} pretraining tokens in {d.num_pretrain_seqs:,} packed "
        f"sequences of {d.seq_len}; data digest `{d.data_digest}`.",
        "",
        "| dataset | records | sha256 |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {v.num_records} | `{v.sha256}` |" for k, v in sorted(d.datasets.items())]
    lines += ["", "Sources:", ""]
    lines += [f"- {s.name} ({s.kind}): {s.num_records} records, `{s.sha256}`" for s in d.sources]
    lines += ["", "## Stages", ""]
    for stage in rec.stages:
        record = rec.records.get(stage)
        lines += [
            f"### {stage}",
            "",
            "```yaml",
            yaml.safe_dump(
                p.stage(stage).model_dump(mode="json"),
                sort_keys=False,
            ).rstrip(),
            "```",
            "",
        ]
        if record is not None:
            env = record.environment
            lines += [
                f"Run `{record.run_id or 'not synced'}`, seed {record.seed}, commit "
                f"`{record.git.commit or 'unknown'}` (dirty: {record.git.dirty}); "
                f"world size {env.get('world_size', '?')}, {env.get('num_threads', '?')} "
                f"threads per process, torch {env.get('torch', '?')} on "
                f"{env.get('gpu', env.get('machine', '?'))}; {record.started} to "
                f"{record.finished}.",
                "",
            ]
    lines += [
        "## Results",
        "",
        _results_table(rec.final_results()),
        "",
        "Curves: `evals/plots/`. Per-checkpoint results: `evals/results/`.",
        "",
        "## How to reproduce",
        "",
        "```bash",
        "pip install -r code/requirements.txt   # the recorded environment",
        "pip install -e code                    # openrelease at the recorded source",
        "cp configs/params.yaml configs/dvc.yaml . && dvc repro",
        "openrelease verify .                   # check every file of this release",
        "```",
        "",
        "`code/SOURCE.json` names the commit the source comes from; `data/order.json` gives "
        "the samples each checkpoint consumed, and `states/` holds resumable training states.",
        "",
        "Same hardware class, world size and thread count give bitwise-identical "
        "checkpoints (deterministic mode); elsewhere expect small numerical drift.",
        "",
    ]
    return "\n".join(lines)


def research_paper(rec: ReleaseRecord) -> str:
    """A paper-shaped write-up generated from the record (used when params name no paper)."""
    final = rec.final_results()
    last = final.get(rec.final_stage)
    result = ", ".join(f"{k} {v:.3g}" for k, v in sorted(last.metrics.items())) if last else "n/a"
    return "\n".join(
        [
            f"# {rec.params.release.name}: a fully reproducible "
            f"{len(rec.stages)}-stage training run",
            "",
            "*Generated by openrelease from the run record; every number is traceable to "
            "MANIFEST.json.*",
            "",
            "## Abstract",
            "",
            f"We train a {rec.num_params() / 1e6:.2f}M-parameter decoder-only transformer from "
            f"scratch with {_stage_phrases(list(rec.stages))}, and release every artefact needed "
            f"to reproduce it bit for bit. The final model reaches {result} on held-out problems.",
            "",
            "## Method",
            "",
            "Data order is a pure function of (seed, data digest, stage, step); "
            "training uses FSDP2 with deterministic kernels, and every checkpoint records the "
            "digest of the samples it consumed and of its parent checkpoint.",
            "",
            "## Results",
            "",
            _results_table(final),
            "",
            "## Reproducibility",
            "",
            "See docs/technical_report.md for hyperparameters, compute and the exact commands.",
            "",
        ]
    )
