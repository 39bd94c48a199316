"""QuPeD, federated (Ozkara et al., NeurIPS 2021): every client learns its own quantized,
personalised model by knowledge distillation (KD) from a global model trained with FedAvg, in
one process (an in-process simulation of the clients and the server), with the baselines QuPeL,
FedAvg, FedAvg with local fine-tuning and local training on the same split.

Edit the hyperparameters below and run `python main_federated.py`, or override any of them:
    python main_federated.py --n_clients=10 --partition=dirichlet --dirichlet_alpha=0.3
Each run writes its logs, partition and checkpoints to {results_dir}/{run_name}/
(docs/federated.md). `--resume=Results/<run>` continues a killed run. The algorithm's units
live in federated.py, which flower_app.py runs on Flower.
"""
if __name__ == '__main__':  # first, so that a Ctrl-C while torch loads ends quietly too
    import startup  # noqa: F401
import json
import os
import sys
import time

import torch

import data
import federated
import resnet
import runs
import runtime
import training

# ---------------------------------------------------------------------------------------------
# Hyperparameters. Where the paper's federated settings could not be read, these are our choices
# (docs/federated.md): the KD weights and forms, lambda_coef, global_lr, ft_lr and ft_epochs were
# chosen on validation accuracy; the schedule is Algorithm 1's 250 epochs scaled to 150 rounds.
algorithm = 'quped'            # quped; qupel (L2 pull in place of KD); fedavg (the global model);
                               # fedavg_ft (it, fine-tuned on each client); fedavg_qft (it,
                               # fine-tuned by Algorithm 1 at each client's bits); local (no
                               # server); central (the global model on the union of the clients'
                               # training images; no client trains: a teacher to start from)
n_clients = 20                 # clients in the federation
client_fraction = 1.0          # share of the clients sampled each round (local: all train)
rounds = 150                   # communication rounds
local_epochs = 1               # epochs over its own data a sampled client runs per round
BATCH_SIZE = 50                # clients' batch size
partition = 'pathological'     # 'pathological' (classes_per_client classes each) or 'dirichlet'
classes_per_client = 3         # pathological: classes per client, 1..10
dirichlet_alpha = 0.5          # dirichlet: label concentration (small: few classes per client)
val_fraction = 0.15            # share of each client's training images held out for validation
client_bits = (1, 2)           # personalised models' bits (n = 2**bits centers; 0 = full
                               # precision); every (arch, bits) kind in turn, one per group
client_archs = ('cifarnet',)   # personalised architectures: resnet8/20/32/..., cifarnet(2)
global_arch = 'cifarnet'       # the global (FedAvg) model's architecture
lambda_p = 0.1                 # KD weight in (a) and (b): (1 - lambda_p) CE + lambda_p T^2 KL;
                               # qupel: the L2 pull's weight
temp = 2.0                     # KD temperature T
kd_form = 'hinton'             # KD in (a) and (c): 'hinton' (student's logits / T too) or
                               # 'released' (only the teacher's, quirk 8)
kd_form_center = ''            # KD in the center step (b): '' = kd_form's; 'released' (the
                               # released code's) or 'hinton' sets it apart
global_lambda_p = 0.5          # KD weight of (c), the global copy's step (0: FedAvg's step)
global_teacher = 'quantized'   # (c)'s teacher: 'quantized' Q_c(x_i) or 'full_precision' x_i
teacher_train_mode = True      # w_i teaches with its training-mode logits (False: eval mode)
global_lr = 0.05               # the global copy's local SGD learning rate
global_momentum = 0.9          # its momentum
global_optimizer_reset = True  # its optimizer starts afresh every round (False: kept per client)
weight_decay = 0.0             # its weight decay
aggregation = 'samples'        # FedAvg weights: 'samples' (n_i) or 'uniform' (the paper's sum)
ft_epochs = 2                  # fedavg_ft, fedavg_qft: epochs of fine-tuning before each evaluation
ft_lr = 0.003                  # fedavg_ft: its SGD learning rate (fedavg_qft: Algorithm 1's Adam)
lambda_coef = (1e-3,)          # prox strength, lambda = lambda_coef * round: one value, or one
                               # per entry of client_archs
l1 = True                      # L1 prox and center regulariser (False: L2)
lr2 = 1e-4                     # center learning rate
lr2_milestones = (48, 84)      # rounds (0-based) from which lr2 is divided by 10, then by 100
freeze_round = 120             # hard-quantize and freeze the personalised models' quantized
                               # layers at the start of round freeze_round (1-based)
center_reg_fix = True          # descent sign for the L1 center regulariser (quirk 1 fixed)
cold_start = True              # False: every model of pretrained_path's architecture starts there
pretrained_path = ''           # a full-precision checkpoint, for cold_start=False
global_pretrained = ''         # the global model starts here: a best.pt (a central run's) or a
                               # state_dict of global_arch; '' = its own initialisation
seed = 1234                    # seeds the partition, initialisation, sampling and batches
data_root = 'data'             # folder holding cifar-10-batches-py/ (downloaded when absent)
results_dir = 'Results'        # each run writes to results_dir/run_name/
run_name = ''                  # '' = fed_<algorithm>_<clients>c_<partition>_<date-time>
device = 'auto'                # 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1'
tf32 = False                   # CUDA: TF32 convolutions and matmuls (not the authors' fp32)
resume = ''                    # a run folder: continue that run from its last.pt
# ---------------------------------------------------------------------------------------------
DEFAULTS = runtime.hyperparameters(globals())
KIND = 'federated'  # what this script's run folders are (runs.KINDS)


# --- the in-process run ----------------------------------------------------------------------

def start(cfg, dev):
    """The run's data, clients, global model and sampler, as a round needs them."""
    runtime.seed_everything(cfg['seed'], dev)
    cifar = data.load_cifar10(cfg['data_root'], dev)
    parts = federated.make_partition(cfg, cifar)
    print(f"data: {federated.describe_partition(parts)} ({cfg['partition']}), from "
          f"{data.batches_folder(cfg['data_root'])}")
    print(federated.describe_warm_start(cfg))
    clients = [federated.new_client_state(cfg, client, dev) for client in range(cfg['n_clients'])]
    global_model = federated.new_global_model(cfg, dev)
    global_start = federated.describe_global_start(cfg)
    if global_start:
        print(global_start)
    central = federated.algorithm_of(cfg).server_update is not None
    return parts, {'clients': clients, 'global_model': global_model,
                   'central': federated.new_central_state(cfg, dev) if central else None,
                   'union': federated.union_dataset(cifar, parts) if central else None,
                   'datasets': [federated.client_dataset(cifar, part) for part in parts],
                   'global_copy': None if global_model is None else
                   resnet.build(cfg['global_arch']).to(dev),
                   'sampler': torch.Generator().manual_seed(cfg['seed']), 'best': -1.0,
                   'fingerprint': data.fingerprint(cfg['data_root'])}


def run_round(cfg, run, rnd):
    """Sample, train the sampled clients, aggregate, evaluate every client; the round's row.
    An algorithm that trains no client (`central`) trains the global model itself."""
    clients, global_model, datasets = run['clients'], run['global_model'], run['datasets']
    central = run['central'] is not None
    sampled = [] if central else federated.sample_clients(cfg, run['sampler'])
    global_state = None if global_model is None else federated.model_state(global_model)
    begin = time.perf_counter()
    replies, trained = [], {}
    central_metrics = (federated.algorithm_of(cfg).server_update(
        cfg, run['central'], global_model, run['union']) if central else {})
    for client in runtime.progress(sampled, len(sampled), f"round {rnd + 1}", 'clients trained'):
        new_state, weight, trained[client] = federated.client_round(
            cfg, client, clients[client], global_state, run['global_copy'], datasets[client], rnd)
        if new_state is not None:
            replies.append((new_state, weight))
    if replies:
        global_model.load_state_dict(federated.aggregate(*zip(*replies)))
    training.synchronize(datasets[0]['train_y'].device)
    middle = time.perf_counter()
    communicates = federated.algorithm_of(cfg).communicates
    sent = federated.model_bytes(global_model) if communicates else 0
    entries = [federated.evaluate_client(cfg, client, clients[client], global_model,
                                         datasets[client], rnd, trained.get(client), sent)
               for client in range(cfg['n_clients'])]
    timings = {'train_seconds': middle - begin, 'eval_seconds': time.perf_counter() - middle}
    return {**federated.round_row(cfg, rnd, entries, timings), **central_metrics}


def save(cfg, run, folder, rows):
    """best.pt when the round improves on the validation accuracy, and last.pt."""
    row, files = rows[-1], {}
    if federated.improves(run, row):
        run['best'] = row[federated.SELECTION]
        entries = ([federated.best_client_entry(cfg, client, state)
                    for client, state in enumerate(run['clients'])]
                   if federated.keeps_client_models(cfg) else [])
        files.update(federated.best_file(KIND, cfg, folder, row, entries, run['global_model']))
    files.update(federated.last_file(
        KIND, cfg, folder, rows,
        [federated.saved_client_state(state) for state in run['clients']], run['global_model'],
        run['sampler'], run['best'], run['fingerprint'],
        None if run['central'] is None else federated.saved_central_state(run['central'])))
    federated.write_checkpoints(files)


def restore(cfg, run, checkpoint, folder):
    if checkpoint['clients'] is None:
        raise runtime.ConfigError(
            f"{folder} was trained on Flower, whose clients keep their own states: continue it "
            f"there, with: {runs.resume_command('flower', folder)}")
    for state, saved in zip(run['clients'], checkpoint['clients']):
        federated.load_client_state(state, saved)
    if run['global_model'] is not None:
        run['global_model'].load_state_dict(checkpoint['global'])
    if run['central'] is not None:
        federated.load_central_state(cfg, run['central'], checkpoint['central'],
                                     run['global_model'])
    runtime.restore_rng_states(checkpoint, run['sampler'])
    run['best'] = checkpoint['best']


def final_line(rows, folder):
    best = max(rows, key=lambda row: row[federated.SELECTION])
    return (f"done: test accuracy (all clients' test images) {best['q_test_acc_weighted']:.4f} "
            f"at round {best['round']}, the best on validation, and "
            f"{rows[-1]['q_test_acc_weighted']:.4f} in the last round; outputs in {folder}")


def train(cfg, overrides):
    """A new federated run, or the continuation of cfg['resume']; returns the run folder."""
    checkpoint = None
    if cfg['resume']:
        cfg, checkpoint = runs.resume(cfg['resume'], overrides, federated.RESUMABLE, KIND,
                                      DEFAULTS, federated.check_config)
    dev = runtime.select_device(cfg['device'])
    runtime.prepare_device(dev, cfg['tf32'])
    print(f"device: {runtime.describe_device(dev)}")
    parts, run = start(cfg, dev)
    runs.check_data(checkpoint, run['fingerprint'], cfg['data_root'])
    folder = cfg['resume'] or runs.new_run_folder(
        cfg['results_dir'], cfg['run_name'] or federated.default_run_name(cfg), KIND)
    with runs.locked(folder):
        if checkpoint is None:
            cfg['run_name'] = os.path.basename(os.path.normpath(folder))
            rows = []
        else:
            restore(cfg, run, checkpoint, folder)
            rows = checkpoint['rows']
            runs.write_rows(folder, rows)  # a log a kill left behind last.pt catches up
            print(f"resuming {folder} after round {len(rows)}")
        print('config: ' + json.dumps(cfg))
        runs.write_config(folder, cfg, KIND)
        runs.write_json(os.path.join(folder, 'partition.json'), parts)
        runs.train_loop(folder, rows, cfg['rounds'], lambda rnd: run_round(cfg, run, rnd),
                        lambda rows: save(cfg, run, folder, rows), federated.round_line(cfg), KIND)
    print(final_line(rows, folder))
    return folder


def main(argv=None):
    """Run the federated experiment with `argv` overrides; a bad input ends it with a
    one-paragraph error (exit status 2), Ctrl-C with the command that continues it (exit status
    130), and every file already written stays as it was."""
    return runtime.run_guarded(lambda args: train(*federated.make_config(DEFAULTS, args)),
                               sys.argv[1:] if argv is None else argv,
                               (resnet.CheckpointError, data.DataError, data.PartitionError),
                               lambda: runtime.usage(__file__, DEFAULTS))


if __name__ == '__main__':
    main()
