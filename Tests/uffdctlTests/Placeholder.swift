import XCTest
final class PlaceholderE: XCTestCase { func testPlaceholder() {} }
