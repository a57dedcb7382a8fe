#!/usr/bin/env bash
# Run the pipeline on a folder holding the three GTSRB archives under their official names
# (a copy of the download, or ../shared/data/gtsrb-real on the project's machines), as an
# experiment: fetch.url points at the folder (file://) and the md5 params at its archives.
#
#   bash bench/real_gtsrb.sh DIR [more `dvc exp run` arguments, e.g. -n real -S train.epochs=5]
set -euo pipefail
dir=${1:?usage: bash bench/real_gtsrb.sh DIR [dvc exp run arguments...]}
shift
dir=$(cd "$dir" && pwd)
args=(-S fetch.source=official -S "fetch.url=file://$dir/")
for entry in train=GTSRB-Training_fixed.zip test_images=GTSRB_Final_Test_Images.zip test_gt=GTSRB_Final_Test_GT.zip; do
    key=${entry%%=*} name=${entry#*=}
    [ -f "$dir/$name" ] || { echo "real_gtsrb.sh: $dir/$name not found" >&2; exit 1; }
    args+=(-S "fetch.archives.$key.md5=$(md5sum <"$dir/$name" | cut -c1-32)")
done
echo "dvc exp run ${args[*]} $*"
exec dvc exp run "${args[@]}" "$@"
