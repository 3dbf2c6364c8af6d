"""``python tests/kill_after.py STEP ARGS...``: ``posttrain ARGS...`` in this process, SIGKILLed the moment
its checkpoint ``STEP`` (or a later one) is in place: a kill -9 at a known point of a run, for the
resume tests (no race against a run that may finish before a poll loop sees its checkpoint)."""

import os
import signal
import sys

from posttrain.train import checkpoint

STEP = int(sys.argv[1])


def killing(save):
    def save_then_die(output_dir, step, *args, **kwargs):
        out = save(output_dir, step, *args, **kwargs)
        if step >= STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    return save_then_die


checkpoint.save, checkpoint.save_sharded = killing(checkpoint.save), killing(checkpoint.save_sharded)

if __name__ == "__main__":
    from posttrain.cli import main

    sys.exit(main(sys.argv[2:]))
