"""The Arena: anonymous battles, durable votes (SQLite or PostgreSQL) and the Bradley-Terry leaderboard."""
