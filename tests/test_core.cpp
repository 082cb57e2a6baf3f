#include <gtest/gtest.h>

#include <thread>

#include "moe/core/error.h"
#include "moe/core/log.h"

using namespace moe;

TEST(Errors, CarryKindLocationAndExitCode) {
  try {
    MOE_THROW(ConfigError, "moe.top_k = " << 99 << " too large");
    FAIL() << "no throw";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Config);
    EXPECT_EQ(e.exit_code(), kExitBadInput);
    EXPECT_EQ(e.message(), "moe.top_k = 99 too large");
    std::string what = e.what();
    EXPECT_NE(what.find("ConfigError: moe.top_k = 99 too large [test_core.cpp:"), std::string::npos)
        << what;
    EXPECT_GT(e.line(), 0);
  }
}

TEST(Errors, ExitCodesByKind) {
  EXPECT_EQ(CommError("x").exit_code(), kExitComm);
  EXPECT_EQ(DataError("x").exit_code(), kExitBadInput);
  EXPECT_EQ(CheckpointError("x").exit_code(), kExitBadInput);
  EXPECT_EQ(ShapeError("x").exit_code(), kExitOther);
  EXPECT_EQ(InternalError("x").exit_code(), kExitOther);
}

TEST(Errors, CheckMacroNamesTheCondition) {
  int x = 3;
  try {
    MOE_CHECK(x == 4, "x is " << x);
    FAIL();
  } catch (const InternalError& e) {
    EXPECT_NE(std::string(e.what()).find("x == 4"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("x is 3"), std::string::npos);
  }
  EXPECT_THROW(MOE_CHECK_T(ShapeError, x < 0, "bad"), ShapeError);
  EXPECT_NO_THROW(MOE_CHECK_T(ShapeError, x > 0, "fine"));
}

TEST(Errors, RankNamedWhenSet) {
  std::string what;
  std::thread t([&] {
    set_current_rank(2);
    what = CommError("peer vanished").what();
  });
  t.join();
  EXPECT_NE(what.find("CommError: rank 2: peer vanished"), std::string::npos) << what;
  EXPECT_EQ(current_rank(), -1);
}

TEST(Errors, DescribeForeignExceptionKeepsFirstLine) {
  std::runtime_error e("first line\n  frame #0 noise\n  frame #1 noise");
  std::string line;
  EXPECT_EQ(describe_exception(e, &line), kExitOther);
  EXPECT_EQ(line, "error: first line");
}

TEST(Log, LevelsParse) {
  EXPECT_EQ(parse_log_level("debug"), LogLevel::Debug);
  EXPECT_EQ(parse_log_level("off"), LogLevel::Off);
  EXPECT_THROW(parse_log_level("loud"), ConfigError);
}

TEST(Log, PrefixNamesRank) {
  testing::internal::CaptureStderr();
  std::thread t([] {
    set_current_rank(3);
    MOE_LOG(Info) << "hello " << 42;
  });
  t.join();
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("[moe r3 I "), std::string::npos) << err;
  EXPECT_NE(err.find("hello 42\n"), std::string::npos) << err;
}
