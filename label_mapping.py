"""How many identities a kept list keeps, and its contiguous label map (old label -> new label).

Every key of config/config.py can be overridden: `python label_mapping.py --KEY VALUE`; `--help` lists them.
"""
from utils.runtime import run_stage
from utils.selection import run_label_mapping

if __name__ == "__main__":
    run_stage("label_mapping", run_label_mapping, description=__doc__)
