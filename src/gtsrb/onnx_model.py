"""The ONNX model file: what ``export`` writes into it, and reading it back, checked.

``models/model.onnx`` is the checkpoint's network with a dynamic batch: input ``input``,
float32 [N, 3, S, S] (RGB in [0, 1], minus ``mean``, divided by ``std``, per channel), output
``logits`` [N, 43]. Its metadata (``metadata_props``) carries everything serving needs, so
the file alone can serve: the keys of ``METADATA`` (architecture, image size, normalisation,
class names, the checkpoint's md5 and version of torch, training params and validation
accuracy, the training set's class prior) and ``gtsrb.graph_sha256``, a digest of the graph and its weights: a file whose
weights or nodes were changed after export is refused.

Reading needs ``onnx`` (to check the digest) and ``onnxruntime``, not torch: the server image
that serves ONNX installs no torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtsrb.errors import GtsrbError

FORMAT = 1
INPUT, OUTPUT = "input", "logits"
INPUT_DOC = "float32 [N, 3, S, S]: RGB in [0, 1], minus mean, divided by std (per channel)"
# metadata key -> how to read its value (all are stored as strings)
METADATA = {
    "gtsrb.format": int,
    "gtsrb.arch": str,
    "gtsrb.image_size": int,
    "gtsrb.mean": json.loads,
    "gtsrb.std": json.loads,
    "gtsrb.class_names": json.loads,
    "gtsrb.checkpoint_md5": str,
    "gtsrb.torch_version": str,
    "gtsrb.opset": int,
    "gtsrb.params": json.loads,
    "gtsrb.val_accuracy": json.loads,
    "gtsrb.class_prior": json.loads,
    "gtsrb.input": str,
}
DIGEST = "gtsrb.graph_sha256"
INSTALL_HINT = "pip install onnxruntime onnx (or the project's `serve` extra: pip install 'gtsrb[serve]')"


def graph_digest(model: Any) -> str:
    """sha256 of the serialized graph (its nodes and weights), not of the metadata around it."""
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()


def metadata(ckpt: dict[str, Any], checkpoint_md5: str, opset: int) -> dict[str, str]:
    """The metadata of the export of checkpoint ``ckpt`` (models.py's format)."""
    values = {
        "gtsrb.format": FORMAT,
        "gtsrb.arch": ckpt["arch"],
        "gtsrb.image_size": ckpt["image_size"],
        "gtsrb.mean": ckpt["mean"],
        "gtsrb.std": ckpt["std"],
        "gtsrb.class_names": ckpt["class_names"],
        "gtsrb.checkpoint_md5": checkpoint_md5,
        "gtsrb.torch_version": ckpt.get("torch_version", ""),
        "gtsrb.opset": opset,
        "gtsrb.params": ckpt.get("params", {}),
        "gtsrb.val_accuracy": ckpt.get("val_accuracy"),
        "gtsrb.class_prior": ckpt.get("class_prior"),
        "gtsrb.input": INPUT_DOC,
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def stamp(path: Path, meta: dict[str, str]) -> None:
    """Write ``meta`` and the graph's digest into the ONNX file at ``path`` (in place)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in {**meta, DIGEST: graph_digest(model)}.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"GTSRB traffic-sign classifier ({meta['gtsrb.arch']}); input: {INPUT_DOC}"
    onnx.save(model, str(path))


@dataclass(frozen=True)
class OnnxModel:
    """A checked ONNX model file: its ONNX Runtime session and its metadata."""

    path: Path
    session: Any
    meta: dict[str, Any]

    @property
    def image_size(self) -> int:
        return self.meta["gtsrb.image_size"]

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint fields the rest of the code reads (models.py's names)."""
        return {
            "arch": self.meta["gtsrb.arch"],
            "image_size": self.image_size,
            "mean": self.meta["gtsrb.mean"],
            "std": self.meta["gtsrb.std"],
            "class_names": self.meta["gtsrb.class_names"],
            "params": self.meta["gtsrb.params"],
            "val_accuracy": self.meta["gtsrb.val_accuracy"],
            "class_prior": self.meta["gtsrb.class_prior"],
            "torch_version": self.meta["gtsrb.torch_version"],
            "checkpoint_md5": self.meta["gtsrb.checkpoint_md5"],
        }


def session_options(threads: int = 0, optimization: str = "all") -> Any:
    """ONNX Runtime options: ``threads`` intra-op threads (0: its default, one per core) and a
    graph optimisation level (disable, basic, extended, all)."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = levels[optimization]
    return options


def read(path: str | Path, threads: int = 0, optimization: str = "all") -> OnnxModel:
    """Open and check ``path``: a missing, truncated or tampered file, or one whose metadata or
    input and output shapes do not fit, raises GtsrbError with the reason."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise GtsrbError(f"{path}: reading an ONNX model needs {exc.name}: {INSTALL_HINT}") from None
    # no telemetry: nothing leaves the machine (and a read-only root logged a failure to persist it)
    getattr(ort, "disable_telemetry_events", lambda: None)()
    path = Path(path)
    if not path.is_file():
        raise GtsrbError(f"{path}: ONNX model not found; run `dvc repro export` or `dvc pull {path}`")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends: truncated or not ONNX
        raise GtsrbError(f"{path}: truncated or not an ONNX model ({type(exc).__name__}: {exc})") from None
    raw = {p.key: p.value for p in proto.metadata_props}
    missing = [k for k in (*METADATA, DIGEST) if k not in raw]
    if missing:
        raise GtsrbError(
            f"{path}: not a gtsrb export: metadata {', '.join(missing)} missing (run `gtsrb export`)"
        )
    if raw[DIGEST] != graph_digest(proto):
        raise GtsrbError(
            f"{path}: its graph or weights were changed after export (digest mismatch); refusing it"
        )
    try:
        meta = {k: parse(raw[k]) for k, parse in METADATA.items()}
    except ValueError as exc:
        raise GtsrbError(f"{path}: unreadable metadata ({exc})") from None
    if meta["gtsrb.format"] != FORMAT:
        raise GtsrbError(f"{path}: ONNX export format {meta['gtsrb.format']}, this code reads {FORMAT}")
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(),
            sess_options=session_options(threads, optimization),
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime's own errors (an op it lacks, a bad graph)
        raise GtsrbError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
    size, classes = meta["gtsrb.image_size"], len(meta["gtsrb.class_names"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].shape[1:] != [3, size, size]:
        shapes = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise GtsrbError(f"{path}: input {shapes} does not fit its metadata ({INPUT} [N, 3, {size}, {size}])")
    if len(outputs) != 1 or outputs[0].shape[1:] != [classes]:
        shapes = ", ".join(f"{o.name} {o.shape}" for o in outputs)
        raise GtsrbError(f"{path}: output {shapes} does not fit its {classes} class names")
    if len(meta["gtsrb.mean"]) != 3 or len(meta["gtsrb.std"]) != 3:
        raise GtsrbError(f"{path}: metadata mean and std must have 3 values (RGB)")
    return OnnxModel(path, session, meta)
