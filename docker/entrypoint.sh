#!/bin/sh
# Entrypoint of both images: run the command as a user that can write the output directory
# ($SAP_RUNS_DIR, default /workspace/runs, where ./runs is bind-mounted), so that a run never
# fails at its end for want of permission, and its files belong to whoever owns ./runs.
#
# Started as root (docker-compose here, unless SAP_UID is set; `docker run --user 0`; rootless
# Docker or Podman, where root is you): the command runs as the uid:gid owning the directory
# (setpriv, from util-linux, in both base images). A root-owned directory keeps root: in rootless
# mode that is you, and under a rootful daemon it means Docker created ./runs itself because it
# did not exist (the repository ships runs/ for that reason). No directory: the image's user.
# Started as another uid (the image's own 10001, `docker run --user "$(id -u):$(id -g)"`,
# compose with SAP_UID/SAP_GID, enroot, Apptainer): a directory it cannot write is refused in
# one line naming the fix, exit 2, before anything starts.
set -eu

runs=${SAP_RUNS_DIR:-/workspace/runs}
image_user=10001

if [ "$(id -u)" = 0 ]; then
  uid=$image_user
  gid=$image_user
  if [ -d "$runs" ]; then
    uid=$(stat -c %u "$runs")
    gid=$(stat -c %g "$runs")
  fi
  if [ "$uid" = 0 ]; then
    exec "$@"
  fi
  exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
fi

if [ -d "$runs" ] && [ ! -w "$runs" ]; then
  echo "sap-dist container: $runs (./runs on the host) belongs to uid $(stat -c %u "$runs") and this container runs as uid $(id -u), which cannot write it: start it with --user \"\$(id -u):\$(id -g)\" (compose: SAP_UID=\$(id -u) SAP_GID=\$(id -g) docker compose ...), or as root to run as the directory's owner" >&2
  exit 2
fi
exec "$@"
