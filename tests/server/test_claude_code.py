"""Claude Code (``@anthropic-ai/claude-code``, installed into tests/agents by ``make install-test``) runs one
non-interactive turn against the local server: its Messages requests and streams are understood end to end.

Claude Code's default system prompt and tools are about 21,700 tokens, past the embedded model's 2,048-token window,
so the turn runs in ``--bare`` mode with a short system prompt and no tools. Everything it would send elsewhere
(telemetry, error reports, update checks) is switched off and HOME is a fresh folder."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from api_server import REPO, ServerProcess
from conftest import MODEL

PROJECT_BINARY = REPO / "tests" / "agents" / "node_modules" / ".bin" / "claude"
MAX_OUTPUT_TOKENS = 400  # a reply cut at the limit is an error to Claude Code; the embedded model ends its own


def claude_binary() -> str | None:
    if PROJECT_BINARY.exists():
        return str(PROJECT_BINARY)
    return shutil.which("claude")


@pytest.mark.skipif(claude_binary() is None,
                    reason="Claude Code is not installed (make install-test installs it into tests/agents with npm)")
def test_claude_code_runs_a_turn(server: ServerProcess, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
        "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "sk-local", "ANTHROPIC_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL, "ANTHROPIC_DEFAULT_SONNET_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": MODEL, "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS),
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
    }
    before = len(server.log_text())
    result = subprocess.run(
        [claude_binary(), "--bare", "-p", "Who made the light?", "--max-turns", "1",
         "--system-prompt", "You answer briefly.", "--tools", ""],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.strip(), result.stderr
    requests = re.findall(r"/v1/messages request_id=\S+ outcome=(\w+) prompt_tokens=\d+ completion_tokens=(\d+)",
                          server.log_text()[before:])
    assert requests and all(outcome == "ok" for outcome, _ in requests), requests
    assert all(int(tokens) <= MAX_OUTPUT_TOKENS for _, tokens in requests)
