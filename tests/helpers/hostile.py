"""Hostile inputs shared by the app's in-process and running-server tests (no tests here)."""


def alias_bomb(levels: int) -> str:
    """The 438-byte script that took the server past 7 GB (each level ten times the one before)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{k}: &a{k} [" + ",".join([f"*a{k - 1}"] * 10) + "]" for k in range(1, levels + 1)]
    return "\n".join(lines) + f"\ntitle: *a{levels}\nshots: [x]\n"
