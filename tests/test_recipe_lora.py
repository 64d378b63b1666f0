"""lightdist/recipes/lora_causal_lm.py through the real ``lightdist`` console script.

The documented flow, once per module: make the tiny random Llama where the config expects it
(``python -m lightdist.recipes.tiny_models causal-lm runs/tiny-causal-lm``, called in-process here), run
``lightdist fit`` with the shipped config, then ``lightdist predict`` from its last checkpoint. The
tests check what that left: falling validation loss, adapter-only checkpoints, a PEFT adapter that
loads back, and completions that come from the trained adapter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import torch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lightdist.cli import main as cli_main  # noqa: E402
from lightdist.recipes.lora_causal_lm import LoRACausalLM  # noqa: E402
from lightdist.recipes.tiny_models import main as tiny_models_main  # noqa: E402
from tests.cli_helpers import CONFIGS, run_cli  # noqa: E402

CONFIG = CONFIGS / "lora_causal_lm/cpu.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"]
PROMPTS = ["Return the number of", "Open the file and"]  # one per rank: no padding, same batches in-process
# The config's model.max_new_tokens. With --ckpt_path, LightningCLI takes the model's settings from
# the checkpoint's hyperparameters, so a --model.init_args override there would not apply anyway.
NEW_TOKENS = 32


@dataclass
class LoraRun:
    cwd: Path
    model_dir: Path
    run_dir: Path
    predictions: list[dict[str, object]]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraRun]:
    cwd = tmp_path_factory.mktemp("lora")
    model_dir = cwd / "runs/tiny-causal-lm"  # where the config's model_dir points
    assert tiny_models_main(["causal-lm", str(model_dir)]) == 0
    (cwd / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    # Validating every 4 steps: the tiny model learns most in its first ~30 steps (measured: val_loss
    # 8.23 after 4 steps, 7.67 after 46), so a per-epoch curve would start after the fall.
    run_cli(
        "fit",
        "--config",
        CONFIG,
        "--model.init_args.max_length=32",
        "--data.init_args.max_examples=400",
        "--trainer.max_epochs=2",
        "--trainer.val_check_interval=4",
        *QUIET,
        cwd=cwd,
    )
    run_dir = cwd / "runs/lora_causal_lm"
    run_cli(
        "predict",
        "--config",
        CONFIG,
        "--ckpt_path",
        run_dir / "checkpoints/last.ckpt",
        "--data.init_args.predict_file=prompts.txt",
        "--data.init_args.batch_size=1",
        "--trainer.logger=false",
        "--predictions_file=out.jsonl",
        *QUIET,
        cwd=cwd,
    )
    predictions = [json.loads(line) for line in (cwd / "out.jsonl").read_text().splitlines()]
    yield LoraRun(cwd, model_dir, run_dir, predictions)


def test_val_loss_falls(lora_run: LoraRun) -> None:
    accumulator = EventAccumulator(str(lora_run.run_dir / "tensorboard/version_0"))
    accumulator.Reload()
    val_loss = [event.value for event in accumulator.Scalars("val_loss")]
    val_ppl = [event.value for event in accumulator.Scalars("val_ppl")]
    assert len(val_loss) == 10, val_loss  # 2 epochs of 23 steps, every 4 steps
    assert val_loss[-1] < val_loss[0] - 0.3, f"val_loss did not fall: {val_loss}"
    assert val_ppl[-1] == pytest.approx(float(torch.exp(torch.tensor(val_loss[-1]))), rel=1e-4)


def test_checkpoint_holds_only_the_adapter(lora_run: LoraRun) -> None:
    checkpoint = lora_run.run_dir / "checkpoints/last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    fresh = LoRACausalLM(model_dir=str(lora_run.model_dir), target_modules="all-linear")
    trainable = {name for name, param in fresh.named_parameters() if param.requires_grad}
    assert set(state) == trainable and all("lora_" in name for name in state)
    # 2 layers x 7 linear layers x (A, B): the frozen base (embeddings, norms, projections) stays out
    assert len(state) == 28
    base_bytes = sum(p.numel() * p.element_size() for p in fresh.parameters() if not p.requires_grad)
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert adapter_bytes < base_bytes / 4


def test_adapter_loads_back_with_peft(lora_run: LoraRun) -> None:
    adapter_dir = lora_run.run_dir / "adapter"
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "adapter_config.json").is_file()
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_run.model_dir, local_files_only=True)
    model = peft.PeftModel.from_pretrained(base, adapter_dir)
    loaded = {name: t for name, t in model.state_dict().items() if "lora_" in name}
    state = torch.load(lora_run.run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert len(loaded) == len(state)
    for name, tensor in state.items():
        torch.testing.assert_close(loaded[name.removeprefix("model.")], tensor)
    assert any(name.endswith("lora_B.default.weight") and tensor.abs().sum() > 0 for name, tensor in state.items())


def test_predict_completes_prompts_with_the_trained_adapter(lora_run: LoraRun) -> None:
    rows = sorted(lora_run.predictions, key=lambda row: row["index"])
    assert [row["prompt"] for row in rows] == PROMPTS
    tokenizer = transformers.AutoTokenizer.from_pretrained(lora_run.model_dir, local_files_only=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_run.model_dir, local_files_only=True).eval()

    def greedy(model: torch.nn.Module, prompt: str) -> str:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **encoded,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,  # type: ignore[operator]
                pad_token_id=tokenizer.pad_token_id,
            )
        return str(tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))

    untuned = [greedy(base, prompt) for prompt in PROMPTS]
    tuned_model = peft.PeftModel.from_pretrained(base, lora_run.run_dir / "adapter").eval()
    tuned = [greedy(tuned_model, prompt) for prompt in PROMPTS]
    # --ckpt_path restored the adapter (not just the base from model_dir): the same text as the
    # exported adapter gives, and not what the untuned base says.
    assert [row["completion"] for row in rows] == tuned
    assert tuned != untuned
    assert all(isinstance(text, str) and text for text in tuned)


def test_missing_model_dir_exits_2_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The config as shipped, before making the tiny model: the first thing a new user may hit. The
    # console script's own entry point, in-process: the model is refused in the driver before any
    # worker starts (a subprocess costs ~10 s of imports; tests/test_cli.py runs the real script).
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets these: put them back
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["fit", "--config", str(CONFIG)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: model.model_dir: " in last and "python -m lightdist.recipes.tiny_models causal-lm" in last, last
    assert not (tmp_path / "runs").exists()


def test_only_the_adapter_travels_back_after_a_pool_fit(lora_run: LoraRun) -> None:
    """The frozen base goes to the ranks once (shared, mapped) and never comes back; after fit only
    the trained adapter weights do, and a second fit of the same model sends none of its tensors."""
    import lightning as L

    from lightdist.lightning import TrainerWorker
    from lightdist.lightning import strategy as strategy_module
    from lightdist.recipes.lora_causal_lm import TextFileDataModule
    from tests.conftest import shared_lightning_pool

    model = LoRACausalLM(model_dir=str(lora_run.model_dir), target_modules="all-linear", max_length=16)
    data = TextFileDataModule(batch_size=2, max_examples=16)
    adapters = [p for name, p in model.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    adapter_bytes = sum(p.untyped_storage().nbytes() for p in adapters)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    state_bytes = sum(storages.values())  # once per storage: the embedding and the LM head share one

    def fit() -> dict[str, int]:
        runner = strategy_module._pools[(2, "cpu")]
        before = runner.transfer_stats()
        trainer = L.Trainer(
            strategy="lightdist",
            accelerator="cpu",
            devices=2,
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=data)
        after = runner.transfer_stats()
        return {k: after[k] - before[k] for k in after}

    with shared_lightning_pool(strategy_module, TrainerWorker, "lightning"):
        first = fit()
        # The adapters and the logged metrics (a few scalars), nothing of the base.
        assert adapter_bytes <= first["tensor_bytes_received"] < adapter_bytes + 1024
        assert first["tensor_bytes_sent"] >= state_bytes  # base, adapters (and the data module's tensors)
        second = fit()
        # Nothing of the model; only the previous fit's metric scalars, which the datamodule's
        # reference to its last Trainer carries along.
        assert second["tensor_bytes_sent"] < 1024
        assert second["tensors_resident"] >= len(storages)
        assert adapter_bytes <= second["tensor_bytes_received"] < adapter_bytes + 1024


def test_tiny_models_makes_a_larger_base_on_request_and_refuses_bad_sizes(tmp_path: Path) -> None:
    from transformers import AutoConfig

    assert tiny_models_main(["causal-lm", str(tmp_path / "wide"), "--hidden-size", "64", "--layers", "3"]) == 0
    config = AutoConfig.from_pretrained(tmp_path / "wide", local_files_only=True)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 3, 4)
    with pytest.raises(SystemExit) as exc:
        tiny_models_main(["causal-lm", str(tmp_path / "bad"), "--hidden-size", "64", "--heads", "3"])
    assert exc.value.code == 2
    assert not (tmp_path / "bad").exists()  # refused before anything was written
