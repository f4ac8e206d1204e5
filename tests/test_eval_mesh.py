"""`ift-jax eval` reads a run on its own mesh: params stay sharded, scores equal one device."""

import json
import shutil

import jax
import pytest

from ift_jax import cli, runs, train
from test_train import tiny_config


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    config = tiny_config(steps=2)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
    config.eval.tasks = "synthetic_sentiment"
    config.eval.max_examples, config.eval.max_decode_length = 6, 4
    workdir = tmp_path_factory.mktemp("mesh") / "run"
    train.train_and_evaluate(config, str(workdir))
    return workdir


def _axes(array):
    axes = list(array.sharding.spec)
    while axes and axes[-1] is None:
        axes.pop()
    return tuple(axes)


def test_a_run_is_read_back_on_its_1x4x2_mesh_with_sharded_params(sharded_run):
    run = runs.Run.open(str(sharded_run))
    try:
        assert dict(run.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
        params, step = run.params()
    finally:
        run.close()
    assert step == 2
    query = params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert _axes(query) == ("fsdp", "tensor")
    assert len(query.addressable_shards) == 8
    assert query.addressable_shards[0].data.shape == (32 // 4, 4 // 2, 8)
    embedding = params["token_embedder"]["embedding"]
    assert _axes(embedding) == ("tensor", "fsdp")


def test_eval_on_the_run_mesh_equals_eval_on_one_device(sharded_run, tmp_path):
    on_mesh, on_one = tmp_path / "mesh", tmp_path / "one"
    shutil.copytree(sharded_run, on_mesh)
    shutil.copytree(sharded_run, on_one)
    assert cli.main(["eval", f"--workdir={on_mesh}"]) == 0
    assert cli.main(["eval", f"--workdir={on_one}", "--mesh=1,1,1"]) == 0
    for step in (0, 2):
        got, want = (json.loads((d / "eval" / f"step_{step}.json").read_text())["tasks"]
                     for d in (on_mesh, on_one))
        assert got.keys() == want.keys() == {"synthetic_sentiment"}
        for metric, value in want["synthetic_sentiment"].items():
            assert got["synthetic_sentiment"][metric] == pytest.approx(value, rel=1e-4), metric
        rows = f"predictions/step_{step}/synthetic_sentiment.jsonl"
        got_rows, want_rows = ([json.loads(line) for line in (d / rows).open()]
                               for d in (on_mesh, on_one))
        assert [r["prediction"] for r in got_rows] == [r["prediction"] for r in want_rows]


def test_mesh_flag_and_a_mesh_that_does_not_fit_fall_back_to_fsdp():
    assert runs.parse_mesh("1,4,2") == {"data": 1, "fsdp": 4, "tensor": 2}
    assert runs.parse_mesh("data=2,fsdp=-1") == {"data": 2, "fsdp": -1}
    with pytest.raises(ValueError, match="give three sizes data,fsdp,tensor"):
        runs.parse_mesh("4x2")
    pod = runs.run_mesh({"data": 1, "fsdp": 32, "tensor": 2})  # Trained on 64 chips.
    assert dict(pod.shape) == {"data": 1, "fsdp": jax.device_count() // 2, "tensor": 2}
    assert runs.run_mesh({}, {"data": 1, "fsdp": 1, "tensor": 1}).devices.size == 1
