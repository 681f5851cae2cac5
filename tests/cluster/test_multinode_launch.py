"""launch/distill.sh as two torchrun "nodes" on 127.0.0.1 (NNODES=2, NODE_RANK 0 and 1, one process each,
c10d rendezvous as on a cluster): a TP2 distillation whose two tensor-parallel ranks sit on different nodes
gives exactly the losses of the single-node TP2 run (two ranks under one torchrun)."""
import os
import socket
from concurrent.futures import ThreadPoolExecutor

from cluster_helpers import BASE_ENV, ROOT, distill_args, losses, run_launcher

ITERS = 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_equal_one_node(tiny, uninterrupted, tmp_path):
    save = str(tmp_path / "two_nodes")
    env = dict(BASE_ENV, GPUS="1", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               RDZV_ID="two-nodes-test", CONFIG=os.path.join(ROOT, "examples", "tiny_cpu_distill.yaml"))
    args = ["bash", os.path.join(ROOT, "launch", "distill.sh"), "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true", "data.micro_batch_size=4", *distill_args(tiny, save, ITERS)]
    with ThreadPoolExecutor(2) as pool:  # both "nodes" at once: each waits for the other at the rendezvous
        runs = [pool.submit(run_launcher, args, dict(env, NODE_RANK=str(rank)), str(tmp_path),
                            str(tmp_path / f"node{rank}.log"), 600) for rank in (0, 1)]
        codes = [run.result() for run in runs]
    text = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in text)
    for rank in (0, 1):  # each node ran its own torchrun with the multi-node rendezvous
        assert f"+ node {rank}/2: torchrun --nproc-per-node=1 --nnodes=2 --node-rank={rank} --rdzv-backend=c10d" \
               f" --rdzv-endpoint=127.0.0.1:{env['MASTER_PORT']} --rdzv-id=two-nodes-test" in text[rank]
    got = losses(save)
    assert [i for i, _ in got] == list(range(1, ITERS + 1))
    # bit-identical: the same math, only the collectives cross "nodes"
    assert got == [(r["iteration"], r["kd_loss"]) for r in uninterrupted(ITERS)]
    with open(os.path.join(save, "latest")) as f:
        assert f.read().strip() == f"iter_{ITERS:07d}"
