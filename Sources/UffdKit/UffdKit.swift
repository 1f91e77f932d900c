import CUffd
