"""`main.py` as the distributed tests watch it: every process appends the caption numbers of each
training batch it takes to $RECORD_BATCHES.<process>, and process $STOP_PROCESS sends itself
SIGTERM while it takes batch $STOP_AFTER (as `kill` would, mid-epoch)."""
import os
import signal
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import main  # noqa: E402

shuffled_chunks = dataset._shuffled_chunks


def recorded_chunks(count, batch_size, seed, skip, process=0, processes=1):
    for number, chunk in enumerate(shuffled_chunks(count, batch_size, seed, skip, process, processes), 1):
        if seed is not None:  # a training batch (validation goes in order)
            with open(f"{os.environ['RECORD_BATCHES']}.{process}", "a") as file:
                file.write(" ".join(map(str, chunk.tolist())) + "\n")
            if os.environ.get("STOP_PROCESS") == str(process) and number == int(os.environ["STOP_AFTER"]):
                os.kill(os.getpid(), signal.SIGTERM)
        yield chunk


dataset._shuffled_chunks = recorded_chunks
fire.Fire({"train": main.train})
