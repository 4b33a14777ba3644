"""python -m studio.arena: the Arena's leaderboard from the server's votes, as a table or CSV."""

import argparse
import os
import sys
from pathlib import Path

from studio.arena.battles import load_contestants
from studio.arena.leaderboard import CSV_HEADERS, leaderboard, table_rows, to_csv
from studio.arena.votes import default_votes_url, open_store


def main(argv: list[str] | None = None) -> int:
    """python -m studio.arena [--votes-db URL | --data-dir DIR] [--csv]"""
    parser = argparse.ArgumentParser(prog="python -m studio.arena", description="The Arena's leaderboard.")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DIFFUSION_STUDIO_DATA", "data")),
                        help="the server's --data-dir (default ./data, or $DIFFUSION_STUDIO_DATA)")
    parser.add_argument("--votes-db", default=os.environ.get("DIFFUSION_STUDIO_VOTES_DB"),
                        help="the server's --votes-db, if it was given (a file or postgresql://…)")
    parser.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table")
    args = parser.parse_args(argv)
    url = args.votes_db or default_votes_url(args.data_dir)
    if "://" not in url or url.startswith("sqlite:///"):  # a file: read it only if it is there (opening makes one)
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            print(f"No votes yet: {path} does not exist (give the server's --data-dir or --votes-db).",
                  file=sys.stderr)
            return 1
    store = open_store(url)
    try:
        board = leaderboard([b.as_battle() for b in store.voted_battles()], [c.name for c in load_contestants()])
    finally:
        store.close()
    if args.csv:
        print(to_csv(board), end="")
        return 0
    rows = table_rows(board, missing="–")
    widths = [max(len(str(x)) for x in column) for column in zip(CSV_HEADERS, *rows)]
    for row in (CSV_HEADERS, *rows):
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)))
    same, decided = board.clip_agreement
    if decided:
        print(f"\nCLIP picks the humans' winner in {same} of {decided} decided battles ({same / decided:.0%}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
