"""Teachers to distil (Sec. 4.2): a pretrained flow model's velocity field v(x, t, y, cond), in this project's
convention (t = 0 data, t = 1 noise), for soflow.soflow_loss(teacher=...).

    ours      our checkpoints, trained as flow matching (lam = 1: the network at s = t) or as SoFlow, and the
              released SoFlow ones: v = v_theta(x, t) of Eq. 10, in the parameterization each was trained with
    SiT       willisma/SiT's files (training.sit): v(x, t, y) = -SiT(x, 1 - t, y)

A teacher whose data shape, class count, conditioning or noising schedule differs from the run's is refused:
its velocity field is another one, and distilling it would teach the student the wrong flow.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

import soflow
from training import processes, released, sit


@dataclass
class Teacher:
    """A velocity field to distil, and what it was trained on."""
    net: torch.nn.Module           # the network (eval mode)
    field: Callable                # field(net, x, t, y=None, cond=None) -> v, like x
    schedule: str                  # the noising schedule of its flow (a key of soflow.SCHEDULES)
    note: str                      # what it is, for the run's log

    def velocity(self, net=None):
        """v(x, t, y=None, cond=None) of this teacher's network (or of net, a compiled one, say)."""
        return partial(self.field, self.net if net is None else net)


def cond_width(net):
    """The width of the cond tensor a network takes: an MLP's cond_dim, a U-Net's augment labels; else 0."""
    return net.init_kwargs.get("cond_dim", net.init_kwargs.get("augment_dim", 0))


def open_teacher(path, use_ema=True, procs=processes.Processes()):
    """The Teacher of a checkpoint: ours or released (a file, a run folder or hf://) or SiT's."""
    with processes.rank0_first(procs):           # rank 0 downloads first (hf://), the others read its cache
        path, ckpt = released.read_file(path)
        if sit.is_sit(ckpt):
            weights, schedule, note = sit.sit_weights(ckpt, path, use_ema)
            net = sit.sit_from_state_dict(weights, path)
            return Teacher(net, sit.sit_velocity, schedule, note)
        net, config, note, _ = released.from_checkpoint(ckpt, path, use_ema)
    kind = "flow matching" if config.lam == 1 else "SoFlow"
    note = f"{path}: a {type(net).__name__} trained as {kind}" + (f" ({note})" if note else "")
    return Teacher(net, partial(soflow.velocity, config=config), config.schedule, note)


def check_teacher(teacher, student, shape, config):
    """Raise a ValueError that says why, if the teacher's velocity field is not that of the student's data."""
    theirs, ours = teacher.net, soflow.unwrap(student)
    if released.data_shape(theirs) != tuple(shape):
        raise ValueError(f"it models data of shape {released.data_shape(theirs)}; this run's data has shape "
                         f"{tuple(shape)}")
    if theirs.num_classes != ours.num_classes:
        raise ValueError(f"it has {theirs.num_classes} classes, the student {ours.num_classes}: "
                         "the conditional velocities differ (0: unconditional)")
    if cond_width(theirs) != cond_width(ours):
        raise ValueError(f"it takes a cond tensor of width {cond_width(theirs)}, the student "
                         f"{cond_width(ours)}: it would see another conditioning (augment labels, ...)")
    if teacher.schedule != config.schedule:
        raise ValueError(f"it was trained on the {teacher.schedule} noising schedule, this run uses the "
                         f"{config.schedule} one: x_t and its velocity differ")


def start_teacher(path, student, shape, config, procs, compile=False):
    """(velocity, note) for --teacher: the teacher on this process's device, checked against the run.

    A bad teacher ends the run with the reason (SystemExit) before any step."""
    try:
        teacher = open_teacher(path, procs=procs)
        check_teacher(teacher, student, shape, config)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--teacher {path}: {e}") from e
    net = teacher.net.to(procs.device).requires_grad_(False)
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    velocity = teacher.velocity(torch.compile(net) if compile else net)
    return velocity, f"distilling {teacher.note}, {millions:.2f}M parameters"
