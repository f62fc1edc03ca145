"""examples/config/tie_kd_student.yaml: the recipe's TIE-KD student for fairseq-hydra-train."""

import re

import pytest
from fairseq import checkpoint_utils
from fairseq.optim.adam import FairseqAdamConfig
from omegaconf import OmegaConf
from test_recipes import dry_run, flags

import tiekd_fairseq  # noqa: F401  (fairseq's checkpoint loader needs its allow-listed globals)

from conftest import BIN, REPO, STUDENT_ARCH, USER_DIR, run

CONFIG = REPO / "examples" / "config" / "tie_kd_student.yaml"
# The recipe's flags that pick a registered class: the group's _name in the yaml.
CHOICES = {"--arch": "model._name", "--optimizer": "optimizer._name", "--lr-scheduler": "lr_scheduler._name",
           "--task": "task._name", "--criterion": "criterion._name"}
# The paths of one machine, which the yaml leaves to the command line (`???`); DATA is fairseq-train's positional.
PER_MACHINE = {"DATA": "task.data", "--teacher": "task.teacher", "--save-dir": "checkpoint.save_dir",
               "--user-dir": "common.user_dir"}
# The tiny corpus on a CPU: one process, 2 updates of small batches; valid BLEU (the yaml's beam 4, lenpen 0.6)
# on one batch of 2 sentences, the untrained student's hypotheses cut at 8 tokens.
TINY = {
    "common.cpu": "true", "common.fp16": "false", "distributed_training.distributed_world_size": "1",
    "optimization.update_freq": "[1]", "optimization.max_update": "2", "dataset.max_tokens": "512",
    "dataset.num_workers": "0", "dataset.max_valid_steps": "1", "dataset.batch_size_valid": "2",
    "task.eval_bleu_args": "'{\"beam\": 4, \"lenpen\": 0.6, \"max_len_b\": 8}'",
}


@pytest.fixture(scope="module")
def config():
    """The yaml's fairseq groups as {"group.key": value}; its hydra section aside."""
    loaded = OmegaConf.load(CONFIG)
    return {f"{group}.{key}": OmegaConf.to_container(loaded[group])[key]
            for group in loaded if group != "hydra" for key in loaded[group]}


@pytest.fixture(scope="module")
def recipe():
    """The flags of the WMT14 En-De recipe's tiekd fairseq-train command (dry run, 4 GPUs); its data as DATA."""
    words = next(words for words in dry_run("wmt14_en_de")["tiekd"] if words[0] == "fairseq-train")
    return {"DATA": words[1], **flags(words)}


def config_key(flag, config):
    """The yaml key a fairseq-train flag sets: its name with underscores, in whichever group has it."""
    if flag in CHOICES or flag in PER_MACHINE:
        return CHOICES.get(flag) or PER_MACHINE[flag]
    found = [key for key in config if key.split(".")[1] == flag[2:].replace("-", "_")]
    assert len(found) == 1, f"{flag}: yaml keys {found}"
    return found[0]


def same(value, word):
    """Whether a yaml value is what fairseq-train parses from a flag's word (True for a flag without one)."""
    if isinstance(value, bool) or word is True:
        return value is True and word is True
    if isinstance(value, list):  # --lr and --update-freq take one value per epoch
        return len(value) == 1 and same(value[0], word)
    if isinstance(value, (int, float)):
        return value == float(word)
    return value == word


def hydra_train(corpus, teacher, cwd, *overrides):
    """fairseq-hydra-train on the shipped yaml in `cwd`, its four paths given (the checkpoints in cwd/student)."""
    paths = [f"task.data={corpus.data_bin}", f"task.teacher={teacher}", "checkpoint.save_dir=student",
             f"common.user_dir={USER_DIR}"]
    return run([BIN / "fairseq-hydra-train", "--config-dir", CONFIG.parent, "--config-name", CONFIG.stem, *paths,
                *overrides], check=False, cwd=cwd)


def test_yaml_holds_every_flag_of_the_recipe_tiekd_step(config, recipe):
    """Each flag of the recipe's tiekd fairseq-train is a yaml key of the same value, each path a `???`, and the
    yaml sets nothing else but Adam's epsilon, at fairseq's default."""
    keys = {flag: config_key(flag, config) for flag in recipe}
    for flag, word in recipe.items():
        if flag in PER_MACHINE:
            assert config[keys[flag]] == "???", flag
        else:
            assert same(config[keys[flag]], word), f"{flag} {word} but {keys[flag]}: {config[keys[flag]]}"
    assert set(config) - set(keys.values()) == {"optimizer.adam_eps"}
    assert config["optimizer.adam_eps"] == FairseqAdamConfig().adam_eps


def test_hydra_train_runs_two_tie_kd_updates_with_the_yaml(corpus, teacher, tmp_path, config, recipe):
    """The yaml, shrunk to the tiny corpus by overrides, trains 2 updates of tie_kd; the checkpoint's config holds
    every yaml value not overridden, and the recipe's k and N."""
    arch = {flag: word for flag, word in flags(STUDENT_ARCH).items()
            if flag not in ("--arch", "--share-all-embeddings")}
    # Keys the yaml does not set are appended with `+`.
    model = [f"+model.{flag[2:].replace('-', '_')}={word}" for flag, word in arch.items()]
    proc = hydra_train(corpus, teacher, tmp_path, *(f"{key}={value}" for key, value in TINY.items()), *model)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = re.search(r"\[train\]\[INFO\] - epoch 001 \|.*", proc.stdout)
    assert summary and "| num_updates 2 |" in summary.group() and "| rank " in summary.group()
    # The relative save dir is where the command ran: hydra neither moved the working folder nor made outputs/.
    save_dir = tmp_path / "student"
    assert (save_dir / ".hydra" / "config.yaml").is_file() and not (tmp_path / "outputs").exists()

    state = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    history = state["optimizer_history"][-1]
    assert history["criterion_name"] == "TieKDCriterion" and history["num_updates"] == 2
    cfg = state["cfg"]
    assert cfg.criterion._name == "tie_kd"
    assert cfg.criterion.kd_topk == int(recipe["--kd-topk"])
    assert cfg.criterion.kd_iterations == int(recipe["--kd-iterations"])
    assert cfg.task.teacher == str(teacher) and cfg.model.encoder_embed_dim == int(arch["--encoder-embed-dim"])
    kept = set(config) - set(TINY) - set(PER_MACHINE.values())
    saved = {key: OmegaConf.to_container(cfg[key.split(".")[0]])[key.split(".")[1]] for key in kept}
    assert saved == {key: config[key] for key in kept}


def test_misspelt_override_stops_before_training(corpus, teacher, tmp_path):
    """A key tie_kd does not have, appended by an override, is refused by its dataclass: exit 1, no checkpoint."""
    proc = hydra_train(corpus, teacher, tmp_path, "common.cpu=true", "distributed_training.distributed_world_size=1",
                       "+criterion.kd_topkk=4")
    assert proc.returncode == 1
    assert "Key 'kd_topkk' not in 'TieKDConfig'" in proc.stderr
    assert not list((tmp_path / "student").glob("*.pt"))
