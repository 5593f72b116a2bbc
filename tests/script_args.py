"""The generic script's command line for a short run on the toy task (tests of the script and of what it runs)."""


def args_for(toy_dir, model, out, algo, reward, *extra):
    return ["-i", str(toy_dir), "-tn", "toy", "--reward", reward, "-m", model, "-o", str(out), "-algo", algo,
            "-t", "-e", "1", "-bs", "8", "-v_bs", "16", "-ml", "10", "--max_steps", "3", "-vf", "1",
            "--num_beams", "1", "-lr", "1e-3", *extra]
