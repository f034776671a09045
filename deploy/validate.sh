#!/usr/bin/env bash
# Offline check of the Kubernetes manifests: renders base and both overlays with
# `kubectl kustomize` and validates every rendered document strictly (unknown fields are
# errors) against the schemas of one pinned Kubernetes version, bundled in the pinned
# PyPI kubernetes-validate (no API server, no network). Exits non-zero when a render
# fails or any document is invalid.
#
#   deploy/validate.sh            # needs kubectl (1.32, kustomize 5.5) and kubernetes-validate
#
# .ci/run installs the pinned kubernetes-validate when it is missing.
set -euo pipefail
cd "$(dirname "$0")"

# The Kubernetes version whose schemas the documents must match, and the validator
# release that bundles them (keep these in step with .ci/run).
K8S_VERSION=1.32.0
VALIDATOR_VERSION=1.32.0

die() { echo "deploy/validate.sh: $*" >&2; exit 1; }

command -v kubectl >/dev/null 2>&1 \
  || die "kubectl not found: install kubectl 1.32 (google-cloud-cli's kubectl, or dl.k8s.io), not Debian's kubernetes-client (1.20, too old for kustomize 5)"
# Run as a module: pip may put the console script in a directory that is not on PATH.
validator=(python3 -m kubernetes_validate)
have=$("${validator[@]}" --version 2>/dev/null | awk '{print $NF}') || true
[ -n "$have" ] \
  || die "kubernetes-validate not found for python3: pip install kubernetes-validate==$VALIDATOR_VERSION (or run .ci/run)"
[ "$have" = "$VALIDATOR_VERSION" ] \
  || die "kubernetes-validate $have is installed, this script is pinned to $VALIDATOR_VERSION: pip install kubernetes-validate==$VALIDATOR_VERSION"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
failed=0
for dir in base overlays/dev overlays/prod; do
  file="$out/$(echo "$dir" | tr / -).yaml"
  if ! kubectl kustomize "$dir" >"$file"; then
    echo "FAIL $dir: kubectl kustomize could not render it (see above)" >&2
    failed=1
    continue
  fi
  docs=$(grep -c '^kind:' "$file" || true)
  if [ "$docs" -eq 0 ]; then
    echo "FAIL $dir: rendered no documents" >&2
    failed=1
    continue
  fi
  # --strict: a misspelt or misplaced field is an error, not a silently ignored key.
  # kubernetes-validate exits non-zero on an invalid document, but only *warns* (exit 0)
  # when it has no schema for a kind or apiVersion (a typo in `kind:`, an API removed in
  # this Kubernetes version such as autoscaling/v2beta2). We ship no custom resources, so
  # a missing schema is an error here too.
  rc=0
  report=$("${validator[@]}" --strict --kubernetes-version "$K8S_VERSION" --quiet "$file" 2>&1) || rc=$?
  if [ "$rc" -eq 0 ] && ! grep -qE '^(WARN|ERROR)' <<<"$report"; then
    echo "ok   $dir: $docs documents valid against Kubernetes $K8S_VERSION (strict)"
  else
    printf '%s\n' "$report" >&2
    echo "FAIL $dir: invalid documents (above), kubernetes-validate exit $rc" >&2
    failed=1
  fi
done
exit "$failed"
