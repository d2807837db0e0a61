"""Security checks: ``python -m reliability.audit [--image TAG] [--strict]``.

1. Pickle in the code: any import of pickle-like modules, ``np.load`` without ``allow_pickle=False``,
   ``read_pickle``/``to_pickle``, ``torch.load`` (an AST scan, so comments and docs do not count).
   Calls are matched by name (``np.load``, ``numpy.load``), so an alias would escape it.
2. Known vulnerabilities in ``requirements/serve.txt`` (the image's pins and what they pull in)
   with pip-audit, against PyPI's advisory data, then OSV's. When neither database answers, the
   step is SKIPPED with the reason (``--strict`` makes that an error): pip-audit itself reports
   "No known vulnerabilities found" when it could audit nothing, which must not pass as a pass.
3. Credentials in the image (``--image``): its environment, its build history and files named like
   credentials, plus AWS key patterns in the code it ships.

Exit status: 0 clean (or skipped), 1 findings, 2 a skipped step under ``--strict``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKER = "/usr/bin/docker"
PICKLE_MODULES = frozenset({"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"})
SKIP_DIRS = frozenset({".venv", ".git", "runs", "out", "build", "dist", "__pycache__", ".hypothesis", "bench-results"})
AWS_KEY_ID = re.compile(rb"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_TEXT = re.compile(
    rb"(aws_secret_access_key|aws_session_token)\s*[=:]\s*\S+|-----BEGIN [A-Z ]*PRIVATE KEY-----", re.I
)
SECRET_ENV = re.compile(r"^(AWS_ACCESS_KEY_ID|.*(PASSWORD|SECRET|TOKEN|API_KEY).*)=.+")
CREDENTIAL_FILES = re.compile(r"(^|/)(\.aws/credentials|\.netrc|\.pypirc|\.git-credentials|\.docker/config\.json|"
                              r"id_rsa|id_ed25519|id_ecdsa|\.env)$")


@dataclass
class StepResult:
    name: str
    status: str  # "pass" | "fail" | "skipped"
    details: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"{self.name}: {self.status.upper()}"] + [f"  {d}" for d in self.details]
        return "\n".join(lines)


# 1. Pickle in the code.
def find_pickle_uses(root: Path) -> list[str]:
    """``path:line: what`` for every pickle-capable use in the Python files under ``root``."""
    found = []
    for path in _python_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except SyntaxError:
            continue
        rel = path.relative_to(root)
        found += [f"{rel}:{node.lineno}: {what}" for node, what in _pickle_nodes(tree)]
    return found


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not SKIP_DIRS.intersection(path.relative_to(root).parts):
            yield path


def _pickle_nodes(tree: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    yield node, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            yield node, f"from {node.module} import ..."
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            allow = keywords.get("allow_pickle")
            # Writing a pickled array (a test of the refusal does) is harmless; loading one is not.
            if name in ("np.load", "numpy.load") and not (isinstance(allow, ast.Constant) and allow.value is False):
                yield node, f"{name} without allow_pickle=False"
            elif name.endswith(("read_pickle", "to_pickle")) or name == "torch.load":
                yield node, name


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


# 2. Known vulnerabilities.
def audit_requirements(requirements: Path, services: Sequence[str] = ("pypi", "osv")) -> StepResult:
    """pip-audit each service in turn until one can audit the pins; SKIPPED when none can."""
    name = f"pip-audit {requirements.relative_to(REPO) if requirements.is_relative_to(REPO) else requirements}"
    try:
        import pip_audit  # noqa: F401 - only whether it is installed
    except ImportError:
        return StepResult(name, "skipped", ["pip-audit is not installed (requirements/dev.txt; run make setup)"])
    reasons = []
    for service in services:
        command = [sys.executable, "-m", "pip_audit", "-r", str(requirements), "--no-deps", "-s", service,
                   "--format", "json", "--progress-spinner", "off"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        try:
            deps = json.loads(run.stdout)["dependencies"]
        except (ValueError, KeyError):
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            reasons.append(f"{service}: pip-audit failed: {last[:200]}")
            continue
        audited = [d for d in deps if "skip_reason" not in d]
        if not audited:
            reasons.append(f"{service}: none of the {len(deps)} packages could be audited "
                           f"({deps[0]['skip_reason'] if deps else 'no packages'})")
            continue
        vulnerable = [f"{d['name']} {d['version']}: {', '.join(v['id'] for v in d['vulns'])}"
                      for d in audited if d["vulns"]]
        skipped = [d["name"] for d in deps if "skip_reason" in d]
        details = [f"{service}: {len(audited)} packages audited"
                   + (f", not audited: {', '.join(skipped)}" if skipped else "")]
        return StepResult(name, "fail" if vulnerable else "pass", details + vulnerable)
    return StepResult(name, "skipped", ["no vulnerability database reachable", *reasons])


# 3. Credentials in the image.
def scan_image(image: str) -> StepResult:
    name = f"credentials in image {image}"
    inspect = subprocess.run([DOCKER, "image", "inspect", image, "--format", "{{json .Config.Env}}"],
                             capture_output=True, text=True, timeout=60)
    if inspect.returncode != 0:
        return StepResult(name, "skipped", [f"docker image inspect: {inspect.stderr.strip()[:200]}"])
    findings = [f"ENV {e.split('=', 1)[0]} is set" for e in json.loads(inspect.stdout) or [] if SECRET_ENV.match(e)]
    history = subprocess.run([DOCKER, "history", "--no-trunc", "--format", "{{.CreatedBy}}", image],
                             capture_output=True, timeout=60).stdout
    findings += [f"build history: {m.group(0)[:12].decode()}..." for m in (*AWS_KEY_ID.finditer(history),
                                                                          *SECRET_TEXT.finditer(history))]
    findings += _scan_filesystem(image)
    details = [f"checked the environment, {len(history.splitlines())} history entries and every file name"]
    return StepResult(name, "fail" if findings else "pass", details + findings)


def _scan_filesystem(image: str) -> list[str]:
    """File names like credentials anywhere; AWS key patterns in the code the image ships."""
    created = subprocess.run([DOCKER, "create", image], capture_output=True, text=True, timeout=60)
    if created.returncode != 0:
        return [f"docker create failed: {created.stderr.strip()[:200]}"]
    container = created.stdout.strip()
    findings = []
    try:
        export = subprocess.Popen([DOCKER, "export", container], stdout=subprocess.PIPE)
        assert export.stdout is not None
        with tarfile.open(fileobj=export.stdout, mode="r|") as archive:
            for member in archive:
                if CREDENTIAL_FILES.search(member.name):
                    findings.append(f"file /{member.name}")
                elif member.isfile() and member.name.startswith(("opt/program/", "home/")):
                    data = archive.extractfile(member)
                    if data is not None and (AWS_KEY_ID.search(text := data.read()) or SECRET_TEXT.search(text)):
                        findings.append(f"secret-like text in /{member.name}")
        export.wait(timeout=300)
    finally:
        subprocess.run([DOCKER, "rm", "-f", container], capture_output=True, timeout=60)
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", type=Path, default=REPO / "requirements" / "serve.txt")
    parser.add_argument("--image", help="also scan this image for credentials")
    parser.add_argument("--strict", action="store_true", help="a step that cannot run is an error")
    args = parser.parse_args(argv)

    uses = find_pickle_uses(REPO)
    results = [StepResult("pickle in the code", "fail" if uses else "pass", uses or ["no pickle-capable call"])]
    results.append(audit_requirements(args.requirements.resolve()))
    if args.image:
        results.append(scan_image(args.image))
    for result in results:
        print(result.report())
    if any(r.status == "fail" for r in results):
        return 1
    return 2 if args.strict and any(r.status == "skipped" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
