#!/usr/bin/env bash
# Installs, where missing, the Debian packages that carry the bundled sequences' data:
#   fashion-mnist  dataset-fashion-mnist  /usr/share/datasets/fashion-mnist  (or $ADB_FASHION_MNIST)
#   wordnet        wordnet-base           /usr/share/wordnet                 (or $ADB_WORDNET)
# usage: bash bench/debian-data.sh [fashion-mnist] [wordnet]   (no argument: both)
# Without root or apt it says where to put the files instead and exits 1.
set -euo pipefail

FMNIST=${ADB_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
WORDNET=${ADB_WORDNET:-/usr/share/wordnet}
missing=()
for want in "${@:-fashion-mnist wordnet}"; do
  for name in $want; do
    case "$name" in
      fashion-mnist)
        [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || [ -f "$FMNIST/train-images-idx3-ubyte" ] ||
          missing+=(dataset-fashion-mnist) ;;
      wordnet)
        [ -f "$WORDNET/data.noun" ] || missing+=(wordnet-base) ;;
      *) echo "debian-data.sh: unknown data set $name; use fashion-mnist or wordnet" >&2; exit 2 ;;
    esac
  done
done
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's ${missing[*]}"
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  exit 0
fi
for pkg in "${missing[@]}"; do
  case "$pkg" in
    dataset-fashion-mnist)
      echo "Fashion-MNIST not found in $FMNIST: install Debian's dataset-fashion-mnist, or put the" >&2
      echo "four official idx files (train/t10k images and labels, .gz or not) in a folder and set" >&2
      echo "ADB_FASHION_MNIST=/that/folder" >&2 ;;
    wordnet-base)
      echo "WordNet not found in $WORDNET: install Debian's wordnet-base, or point ADB_WORDNET at a" >&2
      echo "WordNet 3.x dict folder (data.noun, data.verb, ...)" >&2 ;;
  esac
done
exit 1
