"""Model checkpoints are data: exact JSON round trips, validation, no pickle anywhere."""

from __future__ import annotations

import ast
import json
import os
import pickle
import random
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from ia.core.metrics import CHECKPOINTS_REJECTED
from ia.decisions.checkpoint import MemoryModelStore, RedisModelStore
from ia.decisions.feedback import (
    FORMAT,
    MAX_CHECKPOINT_BYTES,
    MAX_INPUTS,
    CheckpointError,
    FeedbackClassifier,
    classifier_inputs,
)
from ia.decisions.learning import MODEL_NAME, FeedbackLearner, MemoryDecisionMemory

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("ia", "schemas", "features", "decisions", "actuators", "streams")
# Modules that turn bytes into objects by running code the bytes choose.
CODE_LOADERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "joblib"}


def _examples(seed: int, n: int) -> list[tuple[dict[str, float], bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        features = {"score_point": rng.random(), "score_window": rng.random(),
                    "residual_z": rng.gauss(0, 3), "n": rng.randrange(1000),
                    "seconds_since_deploy": rng.choice([60.0, 1e6]),
                    "false_positives": rng.randrange(5)}
        action = rng.choice(["restart", "scale_out", "rollback"])
        out.append((classifier_inputs(features, rng.random(), action), rng.random() < 0.4))
    return out


def _trained(examples) -> FeedbackClassifier:
    clf = FeedbackClassifier()
    for x, y in examples:
        clf.learn(x, y)
    return clf


def test_a_restored_model_predicts_and_learns_exactly_as_the_original() -> None:
    original = _trained(_examples(1, 40))
    restored = FeedbackClassifier.loads(original.dumps())
    probe = _examples(2, 30)
    assert restored.version == original.version == 40
    for x, _ in probe:
        assert restored.predict(x) == original.predict(x)
    for x, y in probe:
        original.learn(x, y)
        restored.learn(x, y)
        assert restored.predict(x) == original.predict(x)
    assert restored.dumps() == original.dumps()


def test_the_checkpoint_is_versioned_json() -> None:
    state = json.loads(_trained(_examples(3, 5)).dumps())
    assert state["format"] == FORMAT and state["version"] == 5
    assert set(state) == {"format", "version", "scaler", "logreg"}
    assert state["logreg"]["iterations"] == 5
    assert "action=restart" in state["scaler"]["means"] or \
        "action=scale_out" in state["scaler"]["means"]


def test_no_checkpoint_is_a_fresh_model() -> None:
    assert FeedbackClassifier.loads(None).version == 0
    assert FeedbackClassifier.loads(b"").version == 0


class _Boom:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _state(**changes) -> bytes:
    state = json.loads(_trained(_examples(4, 3)).dumps())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = state
        for name in parents:
            node = node[name]
        node[leaf] = value
    return json.dumps(state).encode()


@pytest.mark.parametrize("blob", [
    pickle.dumps((FORMAT, 3, {"weights": {}})),
    b"\x80\x05not json",
    b"[1, 2, 3]",
    _state(format=2),
    _state(version=-1),
    _state(version=True),
    _state(version=2**60),
    _state(logreg__intercept=float("nan")),
    _state(logreg__intercept="0.5"),
    _state(logreg__weights={"score": float("inf")}),
    _state(logreg__weights=[1.0]),
    _state(logreg__iterations=1.5),
    _state(scaler__vars={"score": -1.0}),
    _state(scaler__counts={"score": 2.0}),
    _state(scaler__means={"x" * 1000: 0.0}),
    _state(scaler__means={f"f{i}": 0.0 for i in range(MAX_INPUTS + 1)}),
    b" " * (MAX_CHECKPOINT_BYTES + 1),
], ids=lambda b: b[:30].decode("latin-1"))
def test_an_invalid_checkpoint_is_refused(blob: bytes) -> None:
    with pytest.raises(CheckpointError):
        FeedbackClassifier.loads(blob)


def _rejected() -> float:
    return CHECKPOINTS_REJECTED.labels(model=MODEL_NAME)._value.get()


async def _plant_and_refresh(store, put, tmp_path: Path) -> tuple[SimpleNamespace, Path]:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    await put(pickle.dumps(_Boom(marker)))
    learner = FeedbackLearner(MemoryDecisionMemory(), store=None, models=store)  # type: ignore[arg-type]
    before = FeedbackClassifier()
    engine = SimpleNamespace(feedback=before)
    rejected = _rejected()
    await learner.refresh(engine)  # type: ignore[arg-type]
    await learner.refresh(engine)  # type: ignore[arg-type]
    assert engine.feedback is before
    assert _rejected() == rejected + 1  # once per stored version, not per batch
    return engine, marker


async def test_a_planted_pickle_is_ignored_in_memory(tmp_path: Path) -> None:
    store = MemoryModelStore()

    async def put(blob: bytes) -> None:
        await store.update(MODEL_NAME, lambda _old: (7, blob))

    _, marker = await _plant_and_refresh(store, put, tmp_path)
    assert not marker.exists()


@pytest.mark.integration
async def test_a_planted_pickle_in_redis_is_rejected_harmlessly(aredis, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = RedisModelStore(aredis, prefix)

    async def put(blob: bytes) -> None:
        await aredis.hset(f"{prefix}:model:{MODEL_NAME}", mapping={"version": 7, "blob": blob})

    _, marker = await _plant_and_refresh(store, put, tmp_path)
    assert not marker.exists()
    # A good checkpoint saved after it is picked up again.
    good = _trained(_examples(5, 8))
    await store.update(MODEL_NAME, lambda _old: (good.version, good.dumps()))
    learner = FeedbackLearner(MemoryDecisionMemory(), store=None, models=store)  # type: ignore[arg-type]
    engine = SimpleNamespace(feedback=FeedbackClassifier())
    await learner.refresh(engine)  # type: ignore[arg-type]
    assert engine.feedback.dumps() == good.dumps()


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_of_the_package_can_unpickle() -> None:
    files = [f for folder in PACKAGE_FOLDERS for f in (ROOT / folder).rglob("*.py")]
    assert len(files) > 50
    offenders = {str(f.relative_to(ROOT)): sorted(_imported_modules(f) & CODE_LOADERS)
                 for f in files if _imported_modules(f) & CODE_LOADERS}
    assert offenders == {}
