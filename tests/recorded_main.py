"""`main.py` as the distributed tests watch it: every process appends the caption numbers of each
training batch it trains on to $RECORD_BATCHES.<process>, and process $STOP_PROCESS sends itself
SIGTERM while it trains on batch $STOP_AFTER (as `kill` would, mid-epoch). Batches are made ahead of
the step (feature_reads.prefetch), in order: each step takes the oldest batch made."""
import collections
import os
import signal
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import main  # noqa: E402
import trainer  # noqa: E402

shuffled_chunks, cross_entropy_step = dataset._shuffled_chunks, trainer.Trainer.cross_entropy_step
made, taken = collections.deque(), []  # (process, chunk) of the training batches made; the steps taken


def recorded_chunks(rows, batch_size, seed, skip, process=0, processes=1, block=1):
    for chunk in shuffled_chunks(rows, batch_size, seed, skip, process, processes, block):
        if seed is not None:  # a training batch (validation goes in order)
            made.append((process, chunk))
        yield chunk


def recorded_step(self, batch, sampling=0.0):
    process, chunk = made.popleft()
    with open(f"{os.environ['RECORD_BATCHES']}.{process}", "a") as file:
        file.write(" ".join(map(str, chunk.tolist())) + "\n")
    taken.append(chunk)
    if os.environ.get("STOP_PROCESS") == str(process) and len(taken) == int(os.environ["STOP_AFTER"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return cross_entropy_step(self, batch, sampling)


dataset._shuffled_chunks = recorded_chunks
trainer.Trainer.cross_entropy_step = recorded_step
fire.Fire({"train": main.train})
