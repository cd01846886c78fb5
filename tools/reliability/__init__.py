"""Reliability tooling for issue 6: fuzzing, chaos (SIGKILL) runs and soak runs against the
real server, plus the helpers the `tests/reliability` suite shares with them."""
