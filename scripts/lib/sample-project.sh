# Helpers that turn examples/sample-odoo into a git repository for the demo and the tests.
#
# Source this file and call the functions, or run it with the function name and its
# arguments, which is how a test can call it without a shell command line:
#
#   source scripts/lib/sample-project.sh && sha=$(make_sample_repo /tmp/sample)
#   bash scripts/lib/sample-project.sh commit_unhealthy /tmp/sample
#
# Each function runs in a subshell, prints only the new commit's sha on stdout, and
# returns non-zero with a message on stderr when a step fails. Every step checks its own
# status because bash ignores errexit inside a function called from `if` or `||`.
# ODOOOPS_TEST_BUSYBOX names the static busybox to copy in (default /bin/busybox).

SAMPLE_PROJECT_SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../examples/sample-odoo" && pwd)

sample_fail() {
    echo "$1" >&2
    exit 1
}

# Commit with a fixed author through -c options, so that neither the global git config nor
# a signing setting of the machine changes what happens.
sample_git_commit() {
    local dir=$1 message=$2
    git -C "$dir" \
        -c user.name="odooops sample" -c user.email="sample@odooops.invalid" \
        -c commit.gpgsign=false \
        commit --quiet --message "$message" || return 1
    git -C "$dir" rev-parse HEAD
}

# Copy the sample project and busybox into DIR (new or empty), commit it on branch main
# and print the commit sha.
make_sample_repo() (
    local dir=${1:?usage: make_sample_repo DIR}
    local busybox=${ODOOOPS_TEST_BUSYBOX:-/bin/busybox}
    if [[ -e $dir && -n $(ls -A "$dir") ]]; then
        sample_fail "make_sample_repo: $dir is not empty"
    fi
    [[ -x $busybox ]] ||
        sample_fail "make_sample_repo: $busybox is missing; install busybox-static"

    mkdir -p "$dir" && cp -R "$SAMPLE_PROJECT_SOURCE/." "$dir/" && cp "$busybox" "$dir/busybox" ||
        sample_fail "make_sample_repo: copying the sample project into $dir failed"
    git -C "$dir" init --quiet --initial-branch=main && git -C "$dir" add --all ||
        sample_fail "make_sample_repo: git init in $dir failed"
    sample_git_commit "$dir" "Add the sample Odoo project" ||
        sample_fail "make_sample_repo: git commit in $dir failed"
)

# Add the unhealthy marker to the sample repository in DIR, commit it and print the new
# sha. The image built from that commit returns 404 on /web/health.
commit_unhealthy() (
    local dir=${1:?usage: commit_unhealthy DIR}
    git -C "$dir" rev-parse --verify --quiet HEAD >/dev/null 2>&1 ||
        sample_fail "commit_unhealthy: $dir is not a git repository with a commit"

    echo "The server in an image built from this commit fails its health check." \
        >"$dir/unhealthy" && git -C "$dir" add unhealthy ||
        sample_fail "commit_unhealthy: adding $dir/unhealthy failed"
    sample_git_commit "$dir" "Make the sample fail its health check" ||
        sample_fail "commit_unhealthy: git commit in $dir failed"
)

# Run as a script: call the function named by the first argument.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    case ${1:-} in
        make_sample_repo | commit_unhealthy) "$@" ;;
        *)
            echo "usage: $0 make_sample_repo DIR | commit_unhealthy DIR" >&2
            exit 2
            ;;
    esac
fi
