"""Stage check_params: validate params.yaml before any stage touches its outputs.

DVC deletes a stage's outputs before running it, so a bad value must be caught here, upstream of
every stage, for earlier results to survive. The output is constant: passing it on never
invalidates the stages below.
"""

from pathlib import Path

from digitpairs import params
from digitpairs.io import run_stage

OK = Path("data/params.ok")


def main() -> None:
    params.load()
    OK.parent.mkdir(parents=True, exist_ok=True)
    OK.write_text("params.yaml passed validation\n")


if __name__ == "__main__":
    run_stage(main)
