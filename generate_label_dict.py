"""Identity -> sample indices, read from the record headers alone (no image is decoded).

Every key of config/config.py can be overridden: `python generate_label_dict.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.selection import run_label_dict

if __name__ == "__main__":
    run_stage("generate_label_dict", run_label_dict, description=__doc__)
