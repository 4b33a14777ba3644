"""python -m studio.evaluation: see studio/evaluation/evaluate.py."""

from studio.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
