"""The user's workflow end to end, through the real command lines (default test run):

generated unlabeled 2D+3D data -> nnssl_joint prepare -> plan_and_preprocess -> nnUNetv2_train -tr
JointSSLPretrainTrainer (2 tiny epochs) -> --c resume with identical state -> downstream planning of the
labeled task -> nnUNetv2_train 2d / 3d_fullres with -pretrained_weights (loaded tensors equal the
pretrained ones) -> nnUNetv2_predict on the test cases.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
PRETRAIN_RUN = "Dataset900_JointPretrain/JointSSLPretrainTrainer__nnsslJointPlans__joint_ssl/fold_all"


def run(cmd: list[str], env: dict, cwd: Path, timeout: int = 600) -> str:
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed "
                             f"({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def workspace(module_tmp_path):
    root = module_tmp_path / "e2e"
    root.mkdir()
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "res"),
               nnUNet_extTrainer=str(Path(__file__).resolve().parents[2] / "trainers"), nnUNet_def_n_proc="1",
               PYTHONUNBUFFERED="1")
    env.pop("nnUNet_n_proc_DA", None)  # planning crashes with 0
    run([str(BIN / "nnssl_joint"), "make-synthetic", "--seed", "1", "--n-3d", "4", "--n-2d", "6", "--n-train",
         "3", "--n-test", "2", "--shape-3d", "12,32,32", "--shape-2d", "40,40"], env, root)
    run([str(BIN / "nnssl_joint"), "prepare", "-d", "501", "502", "-o", "900", "--name", "JointPretrain"],
        env, root)
    out = run([str(BIN / "nnssl_joint"), "plan_and_preprocess", "-d", "900", "-np", "1", "-npfp", "1"], env,
              root)
    train_env = dict(env, nnUNet_n_proc_DA="0")
    cfg = root / "pretrain.json"
    cfg.write_text(json.dumps({"optim": {"num_epochs": 2, "iterations_per_epoch": 2, "save_every": 1},
                               "data": {"batch_size_2d": 6, "batch_size_3d": 2, "n_slices": 6}}))
    train_env["NNSSL_JOINT_CONFIG"] = str(cfg)
    log = run([str(BIN / "nnUNetv2_train"), "900", "joint_ssl", "all", "-tr", "JointSSLPretrainTrainer", "-p",
               "nnsslJointPlans", "-device", "cpu"], train_env, root)
    return {"root": root, "env": env, "train_env": train_env, "plan_log": out, "pretrain_log": log}


def test_pretraining_logs_every_term_and_writes_loadable_files(workspace):
    run_dir = workspace["root"] / "res" / PRETRAIN_RUN
    log = workspace["pretrain_log"]
    for term in ("L_intra", "L_intra_3d", "L_inter", "L_mask"):
        values = re.findall(rf"{term} ([-0-9.naninf]+)", log)
        assert len(values) == 2, f"{term} not logged per epoch:\n{log[-3000:]}"
        assert all(torch.isfinite(torch.tensor(float(v))) for v in values)
    assert "slices/s" in log and "prototype usage entropy" in log and "self-configured" in log
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "pretrained_for_2d.pth",
                 "pretrained_for_3d_fullres.pth", "progress.png", "nnssl_joint_config.json"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp")), "temporary checkpoint files left behind"
    effective = json.loads((run_dir / "nnssl_joint_config.json").read_text())
    assert effective["resolved"]["n_slices"] == 6 and effective["config"]["optim"]["num_epochs"] == 2
    ckpt = torch.load(run_dir / "checkpoint_final.pth", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["nnssl_joint"]["iteration"] == 4
    assert len(ckpt["logging"]["loss_intra"]) == 2


def test_resume_with_c_continues_from_saved_state(workspace):
    root, env = workspace["root"], dict(workspace["train_env"])
    run_dir = root / "res" / PRETRAIN_RUN
    saved = torch.load(run_dir / "checkpoint_final.pth", weights_only=False)
    # restore the saved state into a fresh trainer exactly as --c does and compare every part
    script = f"""
import torch, numpy as np
from nnunetv2.run.run_training import get_trainer_from_args
t = get_trainer_from_args('900', 'joint_ssl', 'all', 'JointSSLPretrainTrainer', 'nnsslJointPlans',
                          device=torch.device('cpu'))
t.load_checkpoint(r'{run_dir / "checkpoint_final.pth"}')
ck = torch.load(r'{run_dir / "checkpoint_final.pth"}', weights_only=False)
sd = t.network.state_dict()
assert sd.keys() == ck['network_weights'].keys()
assert all(torch.equal(sd[k], ck['network_weights'][k]) for k in sd)
assert 'prototypes.weight' in ''.join(sd) and any('.queue.' in k for k in sd)
assert any(k.startswith('volume_key_network.') for k in sd)
opt = t.optimizer.state_dict()
for a, b in zip(opt['state'].values(), ck['optimizer_state']['state'].values()):
    assert all(torch.equal(a[k], b[k]) for k in a)
assert t.iteration == ck['nnssl_joint']['iteration'] and t.current_epoch == ck['current_epoch']
assert torch.equal(torch.get_rng_state(), ck['nnssl_joint']['rng']['torch'])
assert np.array_equal(np.random.get_state()[1], ck['nnssl_joint']['rng']['numpy'][1])
print('STATE-IDENTICAL')
"""
    out = run([sys.executable, "-c", script], env, root)
    assert "STATE-IDENTICAL" in out
    cfg = json.loads(Path(env["NNSSL_JOINT_CONFIG"]).read_text())
    cfg["optim"]["num_epochs"] = 3
    (root / "pretrain3.json").write_text(json.dumps(cfg))
    env["NNSSL_JOINT_CONFIG"] = str(root / "pretrain3.json")
    log = run([str(BIN / "nnUNetv2_train"), "900", "joint_ssl", "all", "-tr", "JointSSLPretrainTrainer", "-p",
               "nnsslJointPlans", "-device", "cpu", "--c"], env, root)
    assert "resumed from epoch 2, iteration 4" in log
    assert "Epoch 2" in log and "Epoch 1\n" not in log
    resumed = torch.load(run_dir / "checkpoint_final.pth", weights_only=False)
    assert resumed["current_epoch"] == 3 and resumed["nnssl_joint"]["iteration"] == 6
    assert resumed["logging"]["loss_intra"][:2] == saved["logging"]["loss_intra"]


def plan_downstream(root: Path, env: dict) -> None:
    """The labeled task planned with the plugin's downstream planner (once per module)."""
    if not (root / "pre" / "Dataset503_SynthOrgans" / "nnsslJointPlans.json").is_file():
        out = run([str(BIN / "nnssl_joint"), "plan_and_preprocess", "-d", "503", "--downstream", "-np", "1",
                   "-npfp", "1"], env, root)
        assert "SliceWiseUNet3D" in out and "JointSSLUNet2D" in out
        # new 3d_fullres plans normalise the encoder over the patch; 2d has no such key; the class default
        # stays per slice, so plans written before the key keep their network
        plans = json.loads((root / "pre" / "Dataset503_SynthOrgans" / "nnsslJointPlans.json").read_text())
        arch = {c: plans["configurations"][c]["architecture"]["arch_kwargs"] for c in ("3d_fullres", "2d")}
        assert arch["3d_fullres"]["norm_over_volume"] is True and "norm_over_volume" not in arch["2d"]
        # three labeled cases: nnU-Net's 5-fold split needs more, so fold 0 gets an explicit split
        cases = sorted(p.name[: -len(".nii.gz")]
                       for p in (root / "raw" / "Dataset503_SynthOrgans" / "labelsTr").iterdir())
        (root / "pre" / "Dataset503_SynthOrgans" / "splits_final.json").write_text(
            json.dumps([{"train": cases[:2], "val": cases[2:]}]))


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_finetune_from_pretrained_weights_and_predict(workspace, configuration):
    root, env = workspace["root"], workspace["env"]
    plan_downstream(root, env)
    weights = root / "res" / PRETRAIN_RUN / f"pretrained_for_{configuration}.pth"
    ft = root / "finetune.json"
    # pretrained parts frozen during the only epoch: their tensors must still equal the pretrained ones
    # after it; the warm-up epoch runs at half the rate, from pretrained weights only
    ft.write_text(json.dumps({"num_epochs": 1, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1,
                              "freeze_pretrained_epochs": 1, "warmup_epochs": 1}))
    train_env = dict(env, nnUNet_n_proc_DA="0", NNSSL_JOINT_FINETUNE_CONFIG=str(ft))
    log = run([str(BIN / "nnUNetv2_train"), "503", configuration, "0", "-p", "nnsslJointPlans", "-tr",
               "JointSSLFinetuneTrainer", "-device", "cpu", "-pretrained_weights", str(weights)], train_env,
              root)
    assert "non-segmentation-head keys present with matching shapes" in log
    assert "pretrained parts: learning rate x 1, frozen for 1 epoch(s)" in log
    assert "1 warm-up epoch(s)" in log and "Current learning rate: 0.005" in log
    out_dir = (root / "res" / "Dataset503_SynthOrgans"
               / f"JointSSLFinetuneTrainer__nnsslJointPlans__{configuration}")
    final = torch.load(out_dir / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    pretrained = torch.load(root / "res" / PRETRAIN_RUN / "checkpoint_final.pth",
                            weights_only=False)["network_weights"]
    parts = ("encoder.",) if configuration == "2d" else ("encoder.", "slice_embedding.", "slice_transformer.")
    keys = [k for k in final if k.startswith(parts)]
    assert len(keys) > 20
    for k in keys:
        assert torch.equal(final[k], pretrained[k]), k
    pred = root / f"pred_{configuration}"
    run([str(BIN / "nnUNetv2_predict"), "-i", str(root / "raw" / "Dataset503_SynthOrgans" / "imagesTs"), "-o",
         str(pred), "-d", "503", "-c", configuration, "-p", "nnsslJointPlans", "-tr",
         "JointSSLFinetuneTrainer",
         "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1", "-nps", "1"],
        dict(env, nnUNet_n_proc_DA="0"), root)
    assert len(list(pred.glob("*.nii.gz"))) == 2
    if configuration == "2d":
        # the same fine-tuning file from random initialisation, started anew in the folder of the pretrained
        # run: stock nnU-Net's schedule (no warm-up, full rate in the first epoch), whatever ran there before
        log = run([str(BIN / "nnUNetv2_train"), "503", configuration, "0", "-p", "nnsslJointPlans", "-tr",
                   "JointSSLFinetuneTrainer", "-device", "cpu"], train_env, root)
        assert "(random initialisation), 0 warm-up epoch(s)" in log
        assert "Current learning rate: 0.01" in log and "Current learning rate: 0.005" not in log
        record = json.loads((out_dir / "fold_0" / "nnssl_joint_finetune_start.json").read_text())
        assert record == {"pretrained_weights": None}


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_new_parts_init_run_keeps_the_seeds_own_decoder(workspace, configuration, tmp_path):
    """new_parts_init 'run': after nnU-Net's loader (maybe_load_checkpoint, as nnUNetv2_train calls it) and
    the trainer's on_train_start step, the pretrained parts equal the file's and every other tensor equals
    the initialisation of a run from scratch with the same seed; with 'file' the decoder is the file's; with
    pretrained_encoder_stages 1 only the first encoder stage is the file's, with [1] only the second."""
    root, env = workspace["root"], workspace["env"]
    plan_downstream(root, env)
    weights = root / "res" / PRETRAIN_RUN / f"pretrained_for_{configuration}.pth"
    script = f"""
import json, os, sys, torch
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
W = r'{weights}'
def trainer(new_parts_init, pretrained, **keys):
    cfg = os.path.join(r'{tmp_path}', new_parts_init + str(len(keys)) + '.json')
    with open(cfg, 'w') as f:
        json.dump({{'seed': 3, 'new_parts_init': new_parts_init, **keys}}, f)
    os.environ['NNSSL_JOINT_FINETUNE_CONFIG'] = cfg
    sys.argv = ['nnUNetv2_train'] + (['-pretrained_weights', W] if pretrained else [])
    t = get_trainer_from_args('503', '{configuration}', '0', 'JointSSLFinetuneTrainer', 'nnsslJointPlans',
                              device=torch.device('cpu'))
    if pretrained:
        maybe_load_checkpoint(t, False, False, W)
    else:
        t.initialize()
    return t
run_init = trainer('run', True)
restored = run_init.keep_run_initialisation()
assert run_init.keep_run_initialisation() == 0
file_init = trainer('file', True)
assert file_init.keep_run_initialisation() == 0
scratch = trainer('run', False)
f = torch.load(W, weights_only=False)['network_weights']
a, b, c = (t.network.state_dict() for t in (run_init, file_init, scratch))
parts = ('encoder.', 'slice_embedding.', 'slice_transformer.')
new = [k for k in a if not k.startswith(parts)]
assert restored == len(new) > 10, (restored, len(new))
for k in a:
    if k.startswith(parts):
        assert torch.equal(a[k], f[k]) and torch.equal(b[k], f[k]), k
    else:
        assert torch.equal(a[k], c[k]), k
        if '.seg_layers.' not in k:
            assert torch.equal(b[k], f[k]), k
assert not all(torch.equal(a[k], f[k]) for k in new if '.seg_layers.' not in k)
# pretrained_encoder_stages 1: only the first encoder stage comes from the file, everything else is scratch's
shallow = trainer('run', True, pretrained_encoder_stages=1)
assert shallow.keep_run_initialisation() > restored
d = shallow.network.state_dict()
first = [k for k in d if k.startswith('encoder.stages.0.')]
assert first and len(first) < len([k for k in d if k.startswith('encoder.')])
for k in d:
    assert torch.equal(d[k], f[k] if k.startswith('encoder.stages.0.') else c[k]), k
# pretrained_encoder_stages [1]: the second encoder stage only; the first is scratch's
second = trainer('run', True, pretrained_encoder_stages=[1])
second.keep_run_initialisation()
e = second.network.state_dict()
for k in e:
    assert torch.equal(e[k], f[k] if k.startswith('encoder.stages.1.') else c[k]), k
print('NEW-PARTS-OK', restored)
"""
    out = run([sys.executable, "-c", script], dict(env, nnUNet_results=str(tmp_path / "res")), root)
    assert "NEW-PARTS-OK" in out and "tensors outside the transferred parts keep this run's own" in out


def test_find_best_configuration_works_unchanged(workspace):
    """After the 2d and 3d_fullres fine-tunings above (fold 0 each), nnU-Net's own model selection runs."""
    root, env = workspace["root"], workspace["env"]
    base = root / "res" / "Dataset503_SynthOrgans"
    if not all((base / f"JointSSLFinetuneTrainer__nnsslJointPlans__{c}" / "fold_0" / "validation"
                / "summary.json").is_file() for c in ("2d", "3d_fullres")):
        pytest.skip("needs test_finetune_from_pretrained_weights_and_predict for both configurations first")
    out = run([str(BIN / "nnUNetv2_find_best_configuration"), "503", "-c", "2d", "3d_fullres", "-p",
               "nnsslJointPlans", "-tr", "JointSSLFinetuneTrainer", "-f", "0", "-np", "1",
               "--disable_ensembling"], env, root)
    assert "inference_instructions" in out or (base / "inference_instructions.txt").is_file(), out[-2000:]

def test_ddp_two_processes_match_one_process_on_the_same_global_batch(workspace):
    """Two gloo processes through the trainer's own code path (DDP, distributed Sinkhorn) compute the
    loss and the update of one process on the concatenated batch, and their loaders draw half the
    global batch each."""
    root = workspace["root"]
    preset = json.loads((Path(__file__).resolve().parents[2] / "plans" / "cpu.json").read_text())
    preset["transformer"]["dropout"] = 0.0  # dropout draws differ between 1 and 2 processes
    (root / "preset_nodrop.json").write_text(json.dumps(preset))
    cfg = {"preset": str(root / "preset_nodrop.json"),
           "data": {"batch_size_2d": 8, "batch_size_3d": 4, "n_slices": 6, "view_size": 32,
                    "n_small_views": 0},
           # the dense term contrasts each process's own share of the batch (docs/pretraining.md), so it
           # is not a global-batch computation: off here; the other defaults on, the contrastive volume
           # term with its momentum keys gathered over the processes included
           "objective": {"freeze_prototypes_iterations": 0, "num_prototypes_2d": 6, "num_prototypes_3d": 2,
                         "lambda_dense": 0.0}}
    (root / "ddp.json").write_text(json.dumps(cfg))
    env = dict(workspace["train_env"], NNSSL_JOINT_CONFIG=str(root / "ddp.json"), OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("ddp_step.py")
    results = {}
    for world in (1, 2):
        out = root / f"ddp_{world}.json"
        run([sys.executable, str(script), str(world), str(out)], env, root, timeout=600)
        results[world] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert len(two["per_rank"]) == 2 and two["per_rank"][0] != two["per_rank"][1]
    # the configured batch is global: one process draws all of it, each of two processes half
    assert one["loader_batch_per_rank"] == [[8, 4]]
    assert two["loader_batch_per_rank"] == [[4, 2], [4, 2]]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5)
    for term in ("intra", "intra_3d", "mask", "volume_contrast"):
        assert two["terms"][term] != pytest.approx(0.0)
    assert len(one["checksums"]) > 50 and one["checksums"].keys() == two["checksums"].keys()
    for key, value in one["checksums"].items():
        assert two["checksums"][key] == pytest.approx(value, rel=1e-4,
                                                      abs=1e-4 * max(1.0, one["abs"][key])), key


def test_wrong_channel_count_fails_before_training_and_export_fixes_it(workspace):
    """A 2-channel task with 1-channel pretrained weights: JointSSLFinetuneTrainer stops before the first
    epoch naming the channel mismatch and the export command; the exported file trains."""
    import shutil

    root, env = workspace["root"], workspace["env"]
    src = root / "raw" / "Dataset503_SynthOrgans"
    dst = root / "raw" / "Dataset504_TwoChannel"
    (dst / "imagesTr").mkdir(parents=True)
    shutil.copytree(src / "labelsTr", dst / "labelsTr")
    cases = sorted(p.name[: -len(".nii.gz")] for p in (src / "labelsTr").iterdir())
    for case in cases:
        for channel in ("0000", "0001"):
            shutil.copy(src / "imagesTr" / f"{case}_0000.nii.gz",
                        dst / "imagesTr" / f"{case}_{channel}.nii.gz")
    dataset_json = json.loads((src / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "MRI", "1": "MRI"}
    (dst / "dataset.json").write_text(json.dumps(dataset_json))
    run([str(BIN / "nnssl_joint"), "plan_and_preprocess", "-d", "504", "--downstream", "-np", "1", "-npfp",
         "1"],
        env, root)
    (root / "pre" / "Dataset504_TwoChannel" / "splits_final.json").write_text(
        json.dumps([{"train": cases[:2], "val": cases[2:]}]))
    ft = root / "finetune504.json"
    ft.write_text(json.dumps({"num_epochs": 1, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1}))
    train_env = dict(env, nnUNet_n_proc_DA="0", NNSSL_JOINT_FINETUNE_CONFIG=str(ft))
    weights = root / "res" / PRETRAIN_RUN / "pretrained_for_3d_fullres.pth"
    cmd = [str(BIN / "nnUNetv2_train"), "504", "3d_fullres", "0", "-p", "nnsslJointPlans", "-tr",
           "JointSSLFinetuneTrainer", "-device", "cpu", "-pretrained_weights"]
    res = subprocess.run(cmd + [str(weights)], env=train_env, cwd=root, capture_output=True, text=True,
                         check=False)
    assert res.returncode != 0
    message = res.stdout + res.stderr
    assert "input channels differ" in message and "nnssl_joint export" in message, message[-3000:]
    assert "Epoch 0" not in message
    exported = root / "two_channel.pth"
    out = run([str(BIN / "nnssl_joint"), "export", "--checkpoint", str(root / "res" / PRETRAIN_RUN /
               "checkpoint_final.pth"), "-d", "504", "-c", "3d_fullres", "-p", "nnsslJointPlans", "-o",
               str(exported)],
              env, root)
    assert "input stem adapted" in out
    log = run(cmd + [str(exported)], train_env, root)
    assert "non-segmentation-head keys present with matching shapes" in log and "Epoch 0" in log


def test_torchrun_two_cpu_processes_pretrain(workspace):
    """The documented multi-node entry (torchrun -m nnssl_joint.distributed_run) on one machine, gloo/CPU."""
    root = workspace["root"]
    cfg = {"optim": {"num_epochs": 1, "iterations_per_epoch": 2},
           "data": {"batch_size_2d": 4, "batch_size_3d": 2, "n_slices": 4, "n_small_views": 0}}
    (root / "torchrun.json").write_text(json.dumps(cfg))
    env = dict(workspace["train_env"], NNSSL_JOINT_CONFIG=str(root / "torchrun.json"), OMP_NUM_THREADS="1",
               nnUNet_results=str(root / "res_torchrun"))
    log = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
               "nnssl_joint.distributed_run", "900", "joint_ssl", "all", "-p", "nnsslJointPlans"], env, root)
    assert "Training done." in log and "batch_size_2d_per_rank" not in log
    run_dir = root / "res_torchrun" / PRETRAIN_RUN
    config = json.loads((run_dir / "nnssl_joint_config.json").read_text())
    assert config["resolved"]["batch_size_2d_per_rank"] == 2
    assert (run_dir / "checkpoint_final.pth").is_file() \
        and (run_dir / "pretrained_for_3d_fullres.pth").is_file()
