"""Assemble a release folder from a workspace's record: MOF 1.0 evidence plus MANIFEST.json.

Reads artifacts/ through the manifest.py schemas (torch only to convert training states to their
pickle-free form); builds in a hidden sibling folder and swaps it in atomically, so a failed
build leaves no half-written bundle behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

import openrelease
from openrelease.audit.mof import COMPONENTS, is_open_license, mof_release_yaml, normalize_license
from openrelease.digest import sha256_bytes, sha256_tree
from openrelease.errors import ArtifactError, ParamsError
from openrelease.layout import (
    BundleSection,
    ALLOWED_SECRETS,
    BUNDLE_MANIFEST,
    BUNDLE_PARAMS,
    CERTIFICATE,
    CERTIFICATE_REL,
    CHECKPOINT_META,
    DATASET_CARD,
    EVAL_CURVE,
    EVAL_LM_EVAL,
    EVAL_LM_EVAL_CURVE,
    HUB_BRANCHES,
    EVAL_METRICS,
    EVAL_PLOTS,
    METRICS,
    PARAMS,
    PORTABLE_STATE_FILES,
    RECORD,
    STAGE_MANIFEST,
    STATE_FILE,
    TOKENIZER_PROBE,
    Workspace,
    bundle_checkpoint_rel,
    bundle_log_rel,
    bundle_state_rel,
    eval_result_rel,
    eval_samples_rel,
    stage_rel,
    state_rel,
)
from openrelease.manifest import (
    AllowedSecretFinding,
    AllowedSecretRule,
    AllowedSecrets,
    BundleManifest,
    CheckpointMeta,
    HubBranches,
    FileEntry,
    ReproCertificate,
    dump_json,
    read_model,
    write_bytes_atomic,
    write_json,
)
from openrelease.params import (
    LicenseParams,
    PipelineParams,
    TrainStageParams,
    load_params,
)
from openrelease.record.journal import journal_dir
from openrelease.release.cards import (
    ReleaseRecord,
    checkpoint_branches,
    component_licenses,
    model_card,
    read_release_record,
    research_paper,
    technical_report,
)
from openrelease.release.datacard import (
    croissant_card,
    dataset_card,
    data_description,
    data_order,
    release_data_files,
)
from openrelease.release.files import (
    FilePlan,
    ProgressFn,
    check_dirs,
    materialize,
    swap_in,
)
from openrelease.secrets import scan_files
from openrelease.release.sbom import BomDataset, BomModel, ml_bom, release_source

logger = logging.getLogger(__name__)

_SPDX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")
_PAPER_SUFFIXES = (".md", ".pdf", ".tex", ".html")


class BundleReport(BaseModel):
    """What `build_bundle` wrote."""

    model_config = ConfigDict(frozen=True)
    out_dir: str
    name: str
    created: str
    """From the record, so rebuilding from the same record gives the same MANIFEST.json."""
    stages: tuple[str, ...]
    num_files: int
    num_bytes: int
    num_linked: int
    """Files hard-linked from the workspace instead of copied."""
    bytes_hashed: int
    """Bytes read to compute a digest; checkpoint and data files reuse their recorded sha256."""
    bundle_digest: str
    components: tuple[str, ...]
    """MOF components the bundle carries evidence for (as listed in mof.yaml)."""
    warnings: tuple[str, ...]


# --------------------------------------------------------------------------- model, checkpoints


def _section(params: PipelineParams, stage: str) -> TrainStageParams:
    return params.stage(stage)


def _plan_checkpoints(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> None:
    """checkpoints/<stage>/step-N/ for every checkpoint; model/ is the last one's files."""
    for stage, manifest in rec.stages.items():
        fix = f"re-run `dvc repro {stage}`"
        for meta in manifest.checkpoints:
            folder = Workspace(project_dir).checkpoint(stage, meta.step)
            meta_path = folder / CHECKPOINT_META
            if not meta_path.is_file():
                raise ArtifactError(f"{meta_path} is missing; {fix}.", path=str(meta_path))
            if read_model(meta_path, CheckpointMeta) != meta:
                raise ArtifactError(
                    f"{meta_path} disagrees with {stage_rel(stage)}/{STAGE_MANIFEST}; {fix}."
                )
            dest = bundle_checkpoint_rel(stage, meta.step)
            plan.add_file(f"{dest}/{CHECKPOINT_META}", meta_path, fix=fix)
            for f in meta.files:
                plan.add_file(
                    f"{dest}/{f.path}",
                    folder / f.path,
                    entry=f,
                    recorded_in=meta_path,
                    immutable=True,
                    fix=fix,
                )
    final_stage = rec.final_stage
    final = rec.stages[final_stage].checkpoints[-1]
    for f in final.files:
        plan.files[f"model/{f.path}"] = plan.files[
            f"{bundle_checkpoint_rel(final_stage, final.step)}/{f.path}"
        ]


def _plan_base_model(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> None:
    """base_model/: the base model's files, when ``release.include_base_model`` asks for them.

    Only under a license MOF counts as open (one that allows redistribution); each file is
    hashed again and must have the sha256 recorded when training fetched it.

    Raises:
        ParamsError: Asked for, but there is no base model or its license is not open.
    """
    if not rec.params.release.include_base_model:
        return
    base = rec.base_model()
    if base is None:
        raise ParamsError(
            "release.include_base_model is true but no stage started from a base model (a "
            "stage's from: hf:ORG/NAME@REVISION or folder); set it to false."
        )
    license_id = normalize_license(base.license) if base.license else None
    if license_id is None or not is_open_license(license_id):
        raise ParamsError(
            f"release.include_base_model: the base model {base.uri} is licensed "
            f"{base.license or 'without a license tag'}, not a license MOF counts as open, so "
            "openrelease does not redistribute it; set release.include_base_model: false "
            "(the release names it by repo, commit and file digests)."
        )
    first = next(
        (s for s, m in rec.stages.items() if m.checkpoints[0].parent_digest == base.digest),
        rec.final_stage,
    )
    meta_path = Workspace(project_dir).checkpoint(first, rec.stages[first].checkpoints[0].step)
    if base.kind == "hf":
        assert base.commit is not None, "a Hub pin has its commit"
        folder = Workspace(project_dir).hub_snapshot("model", base.repo, base.commit)
        fix = f"remove {folder} and run `dvc repro -f {first}` to fetch it again"
    else:
        folder = project_dir / base.repo
        fix = f"restore {base.repo} as it was trained from, or set include_base_model: false"
    for f in base.files:
        plan.add_file(
            f"{BundleSection.BASE_MODEL}/{f.path}",
            folder / f.path,
            entry=f,
            recorded_in=meta_path / CHECKPOINT_META,
            immutable=base.kind == "hf",  # the Hub cache renames a download into place
            fix=fix,
            rehash=True,
        )


def _add_state(plan: FilePlan, folder: Path, dest: str, portable: Path) -> None:
    """Plan a training state in its pickle-free form, converted from the workspace's DCP state.

    DCP metadata is a pickle, so a bundle never ships it (see `openrelease.train.portable`);
    converting needs torch, which a workspace holding training states has.
    """
    try:
        from openrelease.train.portable import export_state
    except ImportError:
        raise ArtifactError(
            "bundling training states converts them to safetensors, which needs torch: "
            "pip install 'openrelease[train]', or set release.retention to keep no state."
        ) from None
    export_state(folder, portable)
    for name in sorted(PORTABLE_STATE_FILES):
        plan.add_file(f"{dest}/{name}", portable / name, immutable=True)


def _plan_states(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> None:
    """states/<stage>/step-N/: the resumable training states the retention policy names."""
    retention = rec.params.release.retention
    for stage, manifest in rec.stages.items():
        section = _section(rec.params, stage)
        every = (section.state_every or section.checkpoint_every) * retention.state_every_k
        steps = set(range(every, manifest.final_step + 1, every)) if every else set()
        steps |= {manifest.final_step} if retention.keep_last else set()
        for step in sorted(steps):
            folder = Workspace(project_dir).state(stage, step)
            if not (folder / STATE_FILE).is_file():
                raise ArtifactError(
                    f"{state_rel(stage, step)} is missing but release.retention "
                    f"names it; raise {stage}.keep_last_states and re-run `dvc repro {stage}`, "
                    "or change release.retention.",
                    path=str(folder),
                )
            portable = Workspace(project_dir).portable_state(stage, step)
            _add_state(plan, folder, bundle_state_rel(stage, step), portable)


def _plan_certificate(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> ReleaseRecord:
    """certificate.json and the states its replays start from, when it certifies this record."""
    path = project_dir / CERTIFICATE_REL
    if not path.is_file():
        return rec
    certificate = read_model(path, ReproCertificate)
    digests = {
        (m.stage, m.step): m.checkpoint_digest for s in rec.stages.values() for m in s.checkpoints
    }
    stale = [
        r for r in certificate.replays if digests.get((r.stage, r.to_step)) != r.recorded_digest
    ]
    starts = {
        r: Workspace(project_dir).state(r.stage, r.from_step)
        for r in certificate.replays
        if r.from_step
    }
    stale += [r for r, folder in starts.items() if not (folder / STATE_FILE).is_file()]
    if stale:
        names = ", ".join(f"{r.stage} steps {r.from_step}..{r.to_step}" for r in stale)
        plan.warn(
            f"{CERTIFICATE_REL} is left out: the record no longer has what it replayed ({names}); "
            "run `openrelease bundle --certify` to replay again"
        )
        return rec
    for r, folder in starts.items():
        portable = Workspace(project_dir).portable_state(r.stage, r.from_step)
        _add_state(plan, folder, bundle_state_rel(r.stage, r.from_step), portable)
    plan.add_file(CERTIFICATE, path)
    return dataclasses.replace(rec, certificate=certificate)


# --------------------------------------------------------------------------- data


def _plan_data(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> None:
    """data/: the data (or pointers), per-file sha256, the Croissant card and the data order."""
    params, data = rec.params, rec.data
    data_dir = project_dir / params.data.out_dir
    manifest_path = data_dir / STAGE_MANIFEST
    org, name = params.release.organization, params.release.name
    repo_url = f"https://huggingface.co/datasets/{org}/{name}-data"
    fix = "re-run `dvc repro data`"
    files = release_data_files(
        data, data_dir, include_data=params.release.include_data, repo_url=repo_url
    )
    for file in (f for f in files if f.url is None):
        entry = FileEntry(path=file.path, size=file.size, sha256=file.sha256)
        src = data_dir / file.path
        plan.add_file(
            f"data/{file.path}",
            src,
            entry=entry,
            recorded_in=manifest_path,
            immutable=True,
            fix=fix,
        )
    pointers = [
        {"path": f.path, "sha256": f.sha256, "size": f.size, "url": f.url} for f in files if f.url
    ]
    for f in data.tokenizer_files:
        plan.add_file(f"data/{f.path}", data_dir / f.path, entry=f, recorded_in=manifest_path)
    plan.add_file(f"data/{STAGE_MANIFEST}", manifest_path, fix=fix)
    plan.add_file(f"data/{TOKENIZER_PROBE}", data_dir / TOKENIZER_PROBE, fix=fix)
    if pointers:
        plan.add_json("data/pointers.json", {"schema_version": 1, "files": pointers})
    card = croissant_card(
        name=f"{name}-data",
        description=data_description(data),
        organization=org,
        license_id=params.release.licenses.data,
        url=repo_url,
        date=rec.created[:10],
        files=files,
    )
    plan.add_json("data/croissant.json", card)
    shipped = {f.path for f in files if f.url is None and f.path.endswith(".jsonl")}
    roles = {
        role: f"data/{e.path}" for role, e in data.datasets.items() if e.path in shipped
    }
    plan.add_text(
        DATASET_CARD,
        dataset_card(
            name=f"{name}-data",
            description=data_description(data),
            license_id=params.release.licenses.data,
            model_repo_id=rec.repo_id,
            roles=roles,
        ),
    )
    order = data_order(
        data,
        seed=params.seed,
        checkpoints={s: m.checkpoints for s, m in rec.stages.items()},
        batch_sizes={s: _section(params, s).global_batch_size for s in rec.stages},
    )
    plan.add_json("data/order.json", order)


# --------------------------------------------------------------------------- evals, logs, configs


def _plan_evals(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> None:
    """evals/: the result of every checkpoint, sample outputs, plots, DVC metrics."""
    eval_dir = Workspace(project_dir).eval_dir
    for r in rec.results:
        rel = eval_result_rel(r.stage, r.step)
        plan.add_file(f"evals/{rel}", eval_dir / rel)
    for stage in rec.stages:
        samples = eval_dir / eval_samples_rel(stage)
        if samples.is_file() and samples.stat().st_size:
            plan.add_file(f"evals/{eval_samples_rel(stage)}", samples)
    extras = [eval_dir / n for n in (EVAL_METRICS, EVAL_CURVE, EVAL_LM_EVAL, EVAL_LM_EVAL_CURVE)]
    plots = eval_dir / EVAL_PLOTS
    extras += sorted(plots.glob("*")) if plots.is_dir() else []
    for path in extras:
        if path.is_file() and not path.name.startswith("."):
            plan.add_file(f"evals/{path.relative_to(eval_dir).as_posix()}", path)


def _plan_logs(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> None:
    """logs/: per-stage metrics, record.json, and the MLflow journal each record points at."""
    ws = Workspace(project_dir)
    for stage in rec.stages:
        metrics = ws.metrics(stage)
        if metrics.is_file():
            plan.add_file(bundle_log_rel(stage, METRICS), metrics)
        else:
            plan.warn(f"{stage_rel(stage)}/{METRICS} is missing; logs/{stage} has no metrics")
    data_dir = project_dir / rec.params.data.out_dir
    for stage, record in rec.records.items():
        record_path = data_dir / RECORD if stage == "data" else ws.record(stage)
        plan.add_file(bundle_log_rel(stage, RECORD), record_path)
        journal = journal_dir(project_dir, record.run_key)
        for name in ("journal.jsonl", "ids.json", "params.resolved.json"):
            if (journal / name).is_file():
                plan.add_file(f"logs/mlflow/{journal.name}/{name}", journal / name)
    missing = [s for s in rec.stages if s not in rec.records]
    if missing:
        plan.warn(f"no record.json for {', '.join(missing)}: logs/ lacks their MLflow runs")


def _plan_configs(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> None:
    """configs/: params.yaml, dvc.yaml, dvc.lock and the resolved params of each stage."""
    params = rec.params
    params_path = project_dir / PARAMS
    if params_path.is_file() and load_params(params_path) == params:
        # The file itself keeps the comments; add_text redacts any secret in it.
        plan.add_text(BUNDLE_PARAMS, params_path.read_text(encoding="utf-8"))
    else:
        dumped = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
        plan.add_text(BUNDLE_PARAMS, dumped)
    for name in ("dvc.yaml", "dvc.lock"):
        if (project_dir / name).is_file():
            plan.add_file(f"configs/{name}", project_dir / name)
    dumped_params = params.model_dump(mode="json")
    resolved = {"data": {k: dumped_params[k] for k in ("seed", "data")}}
    for stage in rec.stages:
        record = rec.records.get(stage)
        sections = ("seed", "compute", "model", stage)
        resolved[stage] = record.params if record else {k: dumped_params[k] for k in sections}
    for stage, body in resolved.items():
        plan.add_json(f"configs/resolved/{stage}.json", body)


# --------------------------------------------------------------------------- code


def _plan_code(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> str:
    """code/: the recorded source, SOURCE.json and requirements.txt; returns the requirements."""
    tree = release_source(project_dir, rec.records)
    for rel, item in tree.files.items():
        if isinstance(item, bytes):
            plan.add_bytes(f"code/{rel}", item)
        else:
            plan.add_file(f"code/{rel}", item)
    plan.add_text("code/requirements.txt", tree.requirements)
    plan.add_json("code/SOURCE.json", tree.source)
    for warning in tree.warnings:
        plan.warn(warning)
    return tree.requirements


# --------------------------------------------------------------------------- documents


def _check_licenses(lic: LicenseParams) -> None:
    for kind in ("code", "data", "documentation", "weights"):
        value: str = getattr(lic, kind)
        if not _SPDX_ID.fullmatch(value):
            raise ParamsError(f"release.licenses.{kind}: {value!r} is not an SPDX license id.")
        if not lic.allow_nonopen and not is_open_license(value):
            raise ParamsError(
                f"release.licenses.{kind}: {value!r} is not a license MOF counts as open "
                "(OSI, FSF-libre or open-data; exact SPDX id); use e.g. Apache-2.0 or "
                "CC-BY-4.0, or set release.licenses.allow_nonopen: true to release under it."
            )


def _license_ids(lic: LicenseParams) -> list[str]:
    return sorted({lic.code, lic.data, lic.documentation, lic.weights})


def _license_text(project_dir: Path, license_id: str) -> bytes:
    local = project_dir / "LICENSES" / f"{license_id}.txt"
    if local.is_file():
        return local.read_bytes()
    packaged = resources.files("openrelease.release").joinpath("license_texts", f"{license_id}.txt")
    if packaged.is_file():
        return packaged.read_bytes()
    raise ParamsError(
        f"release.licenses: openrelease ships no text of {license_id!r}; "
        f"put it at LICENSES/{license_id}.txt in the project."
    )


def _plan_branches(plan: FilePlan, rec: ReleaseRecord) -> None:
    """branches.json: the Hub branch of every checkpoint (``release.branch_name``)."""
    names = checkpoint_branches(rec)
    record = HubBranches(
        template=rec.params.release.branch_name,
        branches={bundle_checkpoint_rel(s, step): b for (s, step), b in names.items()},
    )
    plan.add_json(HUB_BRANCHES, record.model_dump(mode="json"))


def _plan_docs(plan: FilePlan, project_dir: Path, rec: ReleaseRecord) -> str:
    """README.md, docs/ and LICENSES/; returns the research paper's bundle path."""
    lic = rec.params.release.licenses
    _check_licenses(lic)
    for license_id in _license_ids(lic):
        plan.add_bytes(f"LICENSES/{license_id}.txt", _license_text(project_dir, license_id))
    plan.add_text("README.md", model_card(rec))
    plan.add_text("docs/technical_report.md", technical_report(rec))
    paper = rec.params.release.paper
    if paper is None or "://" in paper:
        text = research_paper(rec)
        if paper is not None:
            text = text.replace("\n\n", f"\n\nThe published paper: <{paper}>\n\n", 1)
        plan.add_text("docs/research_paper.md", text)
        return "docs/research_paper.md"
    path = project_dir / paper
    if not path.is_file() or path.suffix.lower() not in _PAPER_SUFFIXES:
        raise ParamsError(
            f"release.paper: {paper!r} is not a .md, .pdf, .tex or .html file in the project; "
            "fix the path, or remove the key to generate one from the record."
        )
    rel = f"docs/research_paper{path.suffix.lower()}"
    plan.add_file(rel, path)
    return rel


def _plan_sbom(plan: FilePlan, rec: ReleaseRecord, requirements: str) -> None:
    """sbom/bom.cdx.json: the final model, its dataset, the recorded environment."""
    params = rec.params
    org, name = params.release.organization, params.release.name
    final = rec.stages[rec.final_stage].checkpoints[-1]
    weights = next(f for f in final.files if f.path.endswith(".safetensors"))
    metrics = rec.final_results().get(rec.final_stage)
    model = BomModel(
        name=name,
        version=rec.version,
        organization=org,
        license_id=params.release.licenses.weights,
        weights_sha256=weights.sha256,
        architecture=f"{params.model.arch.capitalize()}ForCausalLM",
        family=params.model.arch,
        metrics=metrics.metrics if metrics is not None else {},
        properties={
            "openrelease:checkpoint_digest": final.checkpoint_digest,
            "openrelease:stages": rec.stage_chain(),
            "openrelease:tokens_seen": str(final.tokens_seen),
        },
    )
    dataset = BomDataset(
        name=f"{name}-data",
        description=data_description(rec.data),
        license_id=params.release.licenses.data,
        url=f"https://huggingface.co/datasets/{org}/{name}-data",
        digest=rec.data.data_digest,
    )
    bom = ml_bom(
        model=model,
        datasets=[dataset],
        requirements=requirements,
        created=rec.created,
        tool_version=openrelease.__version__,
    )
    plan.add_json("sbom/bom.cdx.json", bom)


def _plan_mof(plan: FilePlan, rec: ReleaseRecord, paper_path: str) -> None:
    """mof.yaml, listing every component whose evidence is in the plan."""
    lic = rec.params.release.licenses
    where = {name: path for name, (_, path) in COMPONENTS.items()}
    where["Research paper"] = paper_path
    paths = {name: path for name, path in where.items() if plan.has(path)}
    if missing := sorted(set(where) - set(paths)):
        plan.warn(f"no evidence for MOF components {missing}")
    licenses = component_licenses(rec.params)
    fine_tuned = any(s != "pretrain" for s in rec.stages)
    text = mof_release_yaml(
        name=rec.params.release.name,
        version=rec.version,
        producer=rec.params.release.organization,
        components={name: licenses[name] for name in paths},
        licenses={
            "distribution": lic.weights,
            "code": lic.code,
            "data": lic.data,
            "document": lic.documentation,
        },
        paths=paths,
        license_paths={i: f"LICENSES/{i}.txt" for i in _license_ids(lic)},
        release_fields={
            "date": rec.created[:10],
            "treatment": "chat fine-tuned" if fine_tuned else "pre-trained",
            "huggingface": f"https://huggingface.co/{rec.params.release.organization}/"
            f"{rec.params.release.name}",
        },
    )
    plan.add_text("mof.yaml", text)
    plan.components = tuple(paths)


def _plan(project_dir: Path, rec: ReleaseRecord) -> FilePlan:
    plan = FilePlan()
    if not_run := [s for s in rec.params.train_stages if s not in rec.stages]:
        plan.warn(f"bundling {rec.stage_chain()}; {', '.join(not_run)} have not run")
    _plan_checkpoints(plan, project_dir, rec)
    _plan_base_model(plan, project_dir, rec)
    _plan_states(plan, project_dir, rec)
    rec = _plan_certificate(plan, project_dir, rec)
    _plan_data(plan, project_dir, rec)
    _plan_evals(plan, project_dir, rec)
    _plan_logs(plan, project_dir, rec)
    _plan_configs(plan, project_dir, rec)
    requirements = _plan_code(plan, project_dir, rec)
    paper_path = _plan_docs(plan, project_dir, rec)
    _plan_branches(plan, rec)
    _plan_sbom(plan, rec, requirements)
    plan.files[f"model/{TOKENIZER_PROBE}"] = plan.files[f"data/{TOKENIZER_PROBE}"]
    _plan_mof(plan, rec, paper_path)  # last: it lists the evidence the plan holds
    return plan


def _record_allowed_secrets(
    plan: FilePlan, tmp_dir: Path, entries: list[FileEntry], params: PipelineParams
) -> list[FileEntry]:
    """Scan the written bundle as publish will; record what is allowed, warn about the rest.

    Writes ``allowed_secrets.json`` (rules and allowed matches) when there is anything to
    record, and returns the entries with it.
    """
    rules = [(r.path, r.reason) for r in params.release.allowed_secrets]
    findings = scan_files(tmp_dir, [e.path for e in entries], rules)
    for f in (f for f in findings if f.allowed_by is None):
        plan.warn(
            f"{f.path}:{f.line} looks like {f.what}; publish will refuse it (mark a fixture's "
            "line `# pragma: allowlist secret`, or list the file in release.allowed_secrets)"
        )
    allowed = [
        AllowedSecretFinding(path=f.path, line=f.line, what=f.what, allowed_by=f.allowed_by)
        for f in findings
        if f.allowed_by is not None
    ]
    if not rules and not allowed:
        return entries
    record = AllowedSecrets(
        rules=tuple(AllowedSecretRule(path=g, reason=why) for g, why in rules),
        allowed=tuple(allowed),
    )
    data = dump_json(record.model_dump(mode="json")).encode()
    write_bytes_atomic(tmp_dir / ALLOWED_SECRETS, data)
    entry = FileEntry(path=ALLOWED_SECRETS, size=len(data), sha256=sha256_bytes(data))
    return sorted([*entries, entry], key=lambda e: e.path)


def build_bundle(
    project_dir: Path,
    out_dir: Path,
    *,
    params: PipelineParams,
    progress: ProgressFn | None = None,
    link: bool = True,
) -> BundleReport:
    """Assemble the release folder ``out_dir`` from the workspace ``project_dir``.

    Args:
        project_dir: The workspace (holds params.yaml and artifacts/).
        out_dir: The release folder; replaced atomically when the build succeeds.
        params: The pipeline params (the ``release`` section decides names and licenses).
        progress: Called as large unrecorded files are hashed (phase ``hash``) and after each
            file is written (phase ``write``), with files and bytes done.
        link: Hard-link large immutable workspace files (weights, shards, states) where the
            filesystem allows; False copies everything.

    Returns:
        What was written, with the bytes hashed and the MOF components evidenced.

    Raises:
        ArtifactError: An input is missing or disagrees with its record; the message names
            the `dvc repro` stage that makes it.
        ParamsError: ``out_dir`` is unsafe to replace, or a license is unknown or not open.
        ProvenanceError: The recorded commit is gone, or a secret would be released.
    """
    check_dirs(project_dir, out_dir)
    rec = read_release_record(project_dir, params)
    plan = _plan(project_dir, rec)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        tmp_dir.mkdir(parents=True)
        entries, stats = materialize(plan, tmp_dir, link=link, progress=progress)
        entries = _record_allowed_secrets(plan, tmp_dir, entries, params)
        digest = sha256_tree({e.path: e.sha256 for e in entries})
        manifest = BundleManifest(
            name=params.release.name,
            created=rec.created,
            files=tuple(entries),
            bundle_digest=digest,
        )
        write_json(tmp_dir / BUNDLE_MANIFEST, manifest)
        swap_in(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return BundleReport(
        out_dir=str(out_dir),
        name=params.release.name,
        created=rec.created,
        stages=tuple(rec.stages),
        num_files=len(entries),
        num_bytes=sum(e.size for e in entries),
        num_linked=stats.linked,
        bytes_hashed=stats.hashed,
        bundle_digest=digest,
        components=plan.components,
        warnings=tuple(plan.warnings),
    )
