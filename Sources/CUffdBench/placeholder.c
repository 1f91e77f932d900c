#include "CUffdBench.h"
