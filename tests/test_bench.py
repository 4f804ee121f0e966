"""bench.py's GPU check, as far as a CPU allows: it refuses without CUDA, and its learning step runs."""

import pytest

import bench


def test_the_gpu_check_refuses_clearly_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--gpu-check needs a CUDA GPU, and this machine has none"):
        bench.gpu_check(str(tmp_path / "gpu-check.json"))
    assert not (tmp_path / "gpu-check.json").exists()


def test_its_learning_step_samples_the_longest_rollouts_and_learns(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "test", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                                   rope_theta=1e6))
    figures = bench.learning_step("test", "cpu", new_tokens=4)
    assert figures["tokens"] == 8 * 8 * 4   # 8 questions x 8 rollouts that never stop
    assert figures["sampling_s"] > 0 and figures["learning_s"] > 0 and figures["peak_gb"] > 0
