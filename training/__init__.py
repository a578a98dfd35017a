"""What the scripts share, one module per concern. Data flows one way: scripts -> training -> soflow.py.

    processes     the process group: started once by a script, ended once; rank 0 first; the gathers
    settings      TrainSettings, and the shared flags derived from it
    data          the CIFAR-10 archive; the dataset rows each step and process reads
    files         atomic writes, PNG grids
    checkpoints   our checkpoint format: its keys, writing, safe reading, random states, resume
    released      ours and the released checkpoints to sample or start from: config.yaml, hf://, --init-from
    sit           SiT's flow-matching DiTs: network, files, velocity in our convention, a student from them
    teachers      --teacher: a checkpoint as a velocity field to distil (Sec. 4.2), checked against the run
    logs          the bar, log.txt, metrics.jsonl, wandb
    sampling      per-image draws, FID of the EMA during training, the SD VAE
    loop          the training loop: Algorithm 1, EMA, precision, grids, checkpoints, stop requests

fid.py sits beside the scripts and imports training.data alone (to read CIFAR-10).
"""
