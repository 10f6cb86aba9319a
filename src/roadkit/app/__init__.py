"""The `roadkit` command-line application (`pip install 'roadkit[cli]'`), built on the core library.

`cli` parses the command line; `runs` and `training` are the training runs (on `RoadTrainer`), `data` the
JSONL data, `loading` the base models (directories, Hub ids, .gguf files), `generation`, `export`, `report`
and `plots` the other commands' work, `outputs` the output directories that appear whole, `demo` the
offline walk-through with its tiny shipped base (`demo_base/`) and `defaults` the command's defaults.
Nothing in the core imports from here.
"""
