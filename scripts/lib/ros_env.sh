# Sourced by scripts/test, scripts/demo and scripts/soak: the built package's environment,
# with DDS kept on this host. Sourced after setup, from any directory.

CLIP_PERCEPTION_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck disable=SC1091
source "$CLIP_PERCEPTION_ROOT/.venv/bin/activate"
if [ -n "${ROS_DISTRO:-}" ] && [ -f "/opt/ros/${ROS_DISTRO}/setup.bash" ]; then
  # shellcheck disable=SC1090
  source "/opt/ros/${ROS_DISTRO}/setup.bash"
fi
# setup.bash files read unset variables; relax nounset while sourcing them.
set +u
# shellcheck disable=SC1091
source "$CLIP_PERCEPTION_ROOT/install/setup.bash"
set -u

export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# Jazzy's replacement for ROS_LOCALHOST_ONLY: discovery never leaves this host.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
# A domain of this run's own (10..99) unless the caller chose one.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( $$ % 90 + 10 ))}"
# Fast DDS's 512 KB shared-memory segment is too small for camera frames: every process here
# (nodes, test publishers, the demo's bag player) uses the package's large-data profile
# unless the caller chose a profile (config/fastdds_large_data.xml says why).
export FASTRTPS_DEFAULT_PROFILES_FILE="${FASTRTPS_DEFAULT_PROFILES_FILE:-$CLIP_PERCEPTION_ROOT/config/fastdds_large_data.xml}"
