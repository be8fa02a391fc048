"""Turns raw text into a trained tokenizer plus ArrayRecord train/validation/test shards.

  python -m launch.prepare_data --gin_file=configs/data/shakespeare.gin --workdir=/tmp/data

Without --workdir the data goes to the shared cache that launch.train uses
(data.cache_dir, $CIRRUS_DATA_DIR or ~/.cache/cirrus/data), keyed by the data config.
"""

from absl import app

from launch import cli
from launch import config as gin_config
from research.data import DataConfig, ensure_prepared, prepare_data
from research.errors import UserError


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; pass settings as --gin_bindings.")
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    data_config = gin_config.build(DataConfig)
    if cli.WORKDIR.value:
        prepared = prepare_data(data_config, cli.WORKDIR.value, log=print)
    else:
        prepared = ensure_prepared(data_config, log=print)
    print(f"prepared data in {prepared.directory}")


if __name__ == "__main__":
    app.run(cli.guarded(main))
