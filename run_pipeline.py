"""The paper's whole experiment in one command (README: "The two commands").

    python run_pipeline.py                       # synthetic data, CPU profile, output/demo
    python run_pipeline.py --profile gpu         # iresnet50 at 112x112 on one GPU
    python run_pipeline.py --rec /data/faces_webface_112x112 --dataset webface --profile gpu

Steps whose outputs are complete are skipped, so an interrupted run resumes when started again.
"""
from utils.pipeline import main

if __name__ == "__main__":
    main()
