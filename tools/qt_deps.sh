#!/usr/bin/env bash
# System packages the napari widget tests need on Debian/Ubuntu: a virtual X server (xvfb-run) and the X/xcb, OpenGL
# (Mesa software rendering) and font libraries that PyQt5's bundled Qt loads for QT_QPA_PLATFORM=xcb. ("offscreen"
# has no OpenGL, which napari's canvas needs.) Installs only what is missing; needs root (CI) or sudo.
# Usage: bash tools/qt_deps.sh [--check]   (--check: exit 1 when something is missing, install nothing)
set -euo pipefail
packages=(
  xvfb xauth libgl1 libgl1-mesa-dri libegl1 libglx-mesa0 libfontconfig1 libfreetype6 libglib2.0-0 libdbus-1-3
  libx11-6 libx11-xcb1 libxext6 libxkbcommon0 libxkbcommon-x11-0 libxcb1 libxcb-icccm4 libxcb-image0 libxcb-shm0
  libxcb-keysyms1 libxcb-randr0 libxcb-render0 libxcb-render-util0 libxcb-shape0 libxcb-sync1 libxcb-xfixes0
  libxcb-xinerama0 libxcb-xkb1
)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  echo "[qt] missing system packages: ${missing[*]}" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "[qt] installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
