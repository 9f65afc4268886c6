"""Stage check_params: validate params.yaml, and the free space a run needs, before any stage touches its
outputs.

DVC deletes a stage's outputs before running it, so a bad value must be caught here, upstream of
every stage, for earlier results to survive a plain ``dvc repro``. (Every stage validates again
first, and restores what DVC deleted, for ``dvc repro -s``.) A DVC cache that fills midway leaves a
half-committed state (digitpairs.core.space), so a run that may not fit is refused here too. The
output is constant: passing it on never invalidates the stages below.
"""

from pathlib import Path

from digitpairs.core.io import run_stage
from digitpairs.core.space import check_free_space

OK = Path("data/params.ok")


def main(p: dict) -> None:
    check_free_space()
    OK.parent.mkdir(parents=True, exist_ok=True)
    OK.write_text("params.yaml passed validation\n")


if __name__ == "__main__":
    run_stage(main)
