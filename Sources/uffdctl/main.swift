print("uffdctl")
