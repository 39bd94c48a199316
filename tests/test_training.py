"""training.py: main_centralized.py's schedule from its configuration against hand-worked values,
the frozen layers left alone, and the protocol functions the bench times equal to what a run of
the script computes."""
import math

import pytest
import torch

import data
import main_centralized as mc
import resnet
import runs
import runtime
import training
from conftest import central_args


# --- schedules -----------------------------------------------------------------------------------

def cfg_with(**changes):
    return {**mc.DEFAULTS, **changes}


@pytest.mark.parametrize('epoch, lam, lam2, lr2, frozen', [
    (0, 1e-4, 1e-4, 1e-4, False), (79, 8e-3, 8e-3, 1e-4, False), (80, 8.1e-3, 8.1e-3, 1e-5, False),
    (139, 1.4e-2, 1.4e-2, 1e-5, False), (140, 1.41e-2, 1.41e-2, 1e-6, False),
    (198, 1.99e-2, 1.99e-2, 1e-6, False), (199, 2e-2, 0, 1e-6, True),
    (200, 2.01e-2, 0, 1e-6, True), (249, 2.5e-2, 0, 1e-6, True)])
def test_default_schedule_by_hand(epoch, lam, lam2, lr2, frozen):
    s = training.protocol_schedule(cfg_with(), epoch)
    assert (s['lam'], s['lam2'], s['lr2'], s['frozen']) == (
        pytest.approx(lam), pytest.approx(lam2), pytest.approx(lr2), frozen)
    assert s['freeze_now'] == (epoch == 199)


@pytest.mark.parametrize('epoch, lam', [(99, 1e-2), (100, 1e-3 * 101), (149, 1e-3 * 150),
                                        (150, 1e-2 * 151)])
def test_sgd_lambda_grows_tenfold_at_each_learning_rate_drop(epoch, lam):
    assert training.protocol_schedule(cfg_with(adam=False), epoch)['lam'] == pytest.approx(lam)
    assert training.protocol_schedule(cfg_with(adam=False, resn=8), epoch)['lam'] == pytest.approx(
        1e-4 * (epoch + 1))  # not for ResNet-8


def test_lambda_drops_follow_the_optimizers_learning_rate():
    cfg = cfg_with(adam=False, lr_milestones=(3, 5))
    optimizer, scheduler = training.build_optimizer(resnet.build('resnet8'), adam=False,
                                                    lr_milestones=cfg['lr_milestones'])
    for epoch in range(7):
        drops = round(math.log10(training.SGD_LR / optimizer.param_groups[0]['lr']))
        assert training.protocol_schedule(cfg, epoch)['lam'] == pytest.approx(
            1e-4 * 10 ** drops * (epoch + 1))
        optimizer.step()  # no gradients: only keeps the scheduler's order check quiet
        scheduler.step()
    assert drops == 2


def test_custom_milestones_freeze_and_fixed_centers():
    cfg = cfg_with(lr2_milestones=(10, 17), freeze_epoch=25, EPOCHS=30)
    lr2 = [training.protocol_schedule(cfg, e)['lr2'] for e in range(30)]
    assert lr2[9] == pytest.approx(1e-4) and lr2[10] == pytest.approx(1e-5)
    assert lr2[17] == pytest.approx(1e-6) and lr2[29] == pytest.approx(1e-6)
    assert [e for e in range(30) if training.protocol_schedule(cfg, e)['freeze_now']] == [24]
    assert not any(training.protocol_schedule(cfg_with(freeze_epoch=300), e)['frozen']
                   for e in range(250))
    assert {training.protocol_schedule(cfg_with(lr2=0.0), e)['lr2'] for e in range(250)} == {0.0}


def test_lr2_after_the_freeze_is_the_references_1e_6_whatever_the_start_value():
    """lr2 1e-2 with a drop at epoch 3 and the freeze at epoch 5 (1-based): 1e-2, then 1e-3,
    then 1e-6 from the epoch after the freeze epoch on (not 1e-2 / 100)."""
    got = [training.schedule(e, 1e-4, 1e-2, (3,), freeze_epoch=5)['lr2'] for e in range(8)]
    assert got == pytest.approx([1e-2] * 3 + [1e-3] * 3 + [1e-6] * 2)


# --- the freeze ----------------------------------------------------------------------------------

def test_frozen_layers_are_left_alone_by_the_optimizer(cifar_root):
    torch.manual_seed(0)
    model = resnet.build('resnet8')
    optimizer, scheduler = training.build_optimizer(model, adam=True)
    state = training.new_state(model, 2, optimizer, scheduler, torch.Generator(), True)
    frozen = training.schedule(4, 1e-4, 1e-4, (), freeze_epoch=3)
    training.start_epoch(state, frozen)
    weights = state['weights']
    quantized_before = weights.flat()
    rest_before = {k: v.clone() for k, v in model.state_dict().items() if k not in weights.names}
    dataset = data.load_cifar10(cifar_root, 'cpu')
    training.train_epoch(state, dataset, 50, frozen, update=False)  # optimizer steps only
    assert torch.equal(weights.flat(), quantized_before)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in rest_before.items()
               if v.is_floating_point())


# --- main_centralized.py's protocol --------------------------------------------------------------

def test_the_protocol_functions_compute_what_a_run_of_the_script_logs(cifar_root, tmp_path):
    """What bench/epoch_time.py times (protocol_state, then protocol_epoch) gives the rows of a
    run of main_centralized.py with the same configuration."""
    folder = mc.main(central_args(cifar_root, tmp_path))
    cfg = {k: v for k, v in runs.read_config(folder).items() if k not in ('kind', 'code')}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    runtime.seed_everything(cfg['seed'], torch.device('cpu'))
    state = training.protocol_state(cfg, resnet.build('resnet8'), torch.device('cpu'))
    cifar = data.with_validation(data.load_cifar10(cfg['data_root'], 'cpu'), cfg['val_fraction'],
                                 cfg['seed'])
    timings = ('train_seconds', 'eval_seconds')
    got = [training.protocol_epoch(cfg, state, cifar, epoch) for epoch in range(cfg['EPOCHS'])]
    assert ([{k: v for k, v in row.items() if k not in timings} for row in got] ==
            [{k: v for k, v in row.items() if k not in timings} for row in runs.read_rows(folder)])
