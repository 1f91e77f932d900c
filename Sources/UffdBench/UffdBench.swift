import UffdKit
